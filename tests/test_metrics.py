"""Metrics on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from avel import metrics as M


def onehot(ids, C):
    ids = np.asarray(ids)
    return np.eye(C, dtype=np.float32)[ids]


# Two videos, T = 5, C = 3 (background = 2).
TRUE = np.array([[2, 0, 0, 0, 2],
                 [1, 1, 2, 2, 2]])
PRED = np.array([[2, 0, 0, 2, 2],      # 4/5 right
                 [1, 2, 2, 0, 2]])     # 3/5 right


def test_segment_accuracy_hand_computed():
    assert M.segment_accuracy(onehot(PRED, 3), onehot(TRUE, 3)) == pytest.approx(7 / 10)
    # Scores instead of one-hot: argmax decides.
    scores = onehot(PRED, 3) * 0.5 + 0.1
    assert M.segment_accuracy(scores, onehot(TRUE, 3)) == pytest.approx(0.7)
    # Class ids are accepted directly.
    assert M.segment_accuracy(PRED, TRUE) == pytest.approx(0.7)
    assert M.segment_accuracy(TRUE, TRUE) == 1.0
    with pytest.raises(ValueError):
        M.segment_accuracy(PRED[:1], TRUE)
    with pytest.raises(ValueError):
        M.segment_accuracy(np.zeros((0, 5), int), np.zeros((0, 5), int))


def test_confusion_matrix_and_per_class():
    cm = M.confusion_matrix(onehot(PRED, 3), onehot(TRUE, 3), 3)
    # rows = true, columns = predicted
    # (true, pred) pairs: video 0 (2,2) (0,0) (0,0) (0,2) (2,2); video 1 (1,1) (1,2) (2,2) (2,0) (2,2)
    expected = np.array([[2, 0, 1],
                         [0, 1, 1],
                         [1, 0, 4]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 10 and np.trace(cm) == 7
    pc = M.per_class_accuracy(cm)
    np.testing.assert_allclose(pc, [2 / 3, 1 / 2, 4 / 5])
    # A class with no true segment: NaN, not 0.
    cm4 = M.confusion_matrix(PRED, TRUE, 4)
    assert cm4.shape == (4, 4)
    assert np.isnan(M.per_class_accuracy(cm4)[3])


def test_video_accuracy():
    pred = np.array([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    target = onehot([1, 1, 2, 0], 3)
    assert M.video_accuracy(pred, target) == pytest.approx(2 / 4)
    assert M.video_accuracy(np.array([1, 0, 2, 2]), np.array([1, 1, 2, 0])) == pytest.approx(2 / 4)


def test_spans():
    bg = 9
    assert M.spans([9, 1, 1, 9, 2, 2, 2, 1, 9, 9], bg) == [(1, 3, 1), (4, 7, 2), (7, 8, 1)]
    assert M.spans([9] * 5, bg) == []
    assert M.spans([3] * 5, bg) == [(0, 5, 3)]
    assert M.spans([3, 9, 3], bg) == [(0, 1, 3), (2, 3, 3)]
    assert M.spans([], bg) == []


def test_event_metrics_hand_computed():
    bg = 2
    true = np.array([[2, 0, 0, 0, 0, 2, 1, 1, 2, 2],     # spans (1,5,0), (6,8,1)
                     [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])    # span (0,4,1)
    pred = np.array([[2, 2, 0, 0, 0, 2, 2, 1, 1, 1],     # (2,5,0): IoU 3/4 hit; (7,10,1): IoU 1/4 miss
                     [1, 1, 2, 2, 0, 0, 2, 2, 2, 2]])    # (0,2,1): IoU 2/4 hit (>= 0.5); (4,6,0): wrong class
    out = M.event_metrics(onehot(pred, 3), onehot(true, 3), bg)
    # 4 predicted spans, 3 true spans, 2 hits.
    assert out["event_precision"] == pytest.approx(2 / 4)
    assert out["event_recall"] == pytest.approx(2 / 3)
    assert out["event_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    strict = M.event_metrics(pred, true, bg, iou=0.6)
    assert strict["event_precision"] == pytest.approx(1 / 4)
    # No predicted span: everything 0, no division error.
    none = M.event_metrics(np.full((1, 10), bg), true[:1], bg)
    assert none == {"event_precision": 0.0, "event_recall": 0.0, "event_f1": 0.0}


def test_event_metrics_one_to_one_matching():
    bg = 2
    true = np.array([[0, 0, 0, 0, 2, 2, 2, 2, 2, 2]])            # one span (0,4,0)
    pred = np.array([[0, 0, 0, 2, 0, 2, 2, 2, 2, 2]])            # (0,3,0) IoU 3/4; (4,5,0) IoU 1/4
    out = M.event_metrics(pred, true, bg, iou=0.2)
    # Both pass the IoU bar but only one may match the single true span.
    assert out["event_precision"] == pytest.approx(1 / 2) and out["event_recall"] == 1.0


def test_summarize():
    names = ["a", "b", "background"]
    s = M.summarize(onehot(PRED, 3), onehot(TRUE, 3), names)
    assert s["accuracy"] == pytest.approx(0.7)
    assert s["segments"] == 10 and s["videos"] == 2
    assert s["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 0.5, "background": 0.8})
    assert np.array_equal(s["confusion_matrix"], M.confusion_matrix(PRED, TRUE, 3))
    s4 = M.summarize(PRED, TRUE, ["a", "b", "c", "background"])
    assert s4["per_class_accuracy"]["background"] is None     # no true segment of class 3


# --- cross-modal window search ----------------------------------------------------------------

def big(T=10):
    return np.full((T, T), 10.0)


def test_window_search_length_one():
    d = big()
    seg = np.array([4])
    d[7, 4] = 0.0             # visual 7 is the closest to audio 4
    d[4, 2] = 0.5             # visual 4 closest to audio 2 (not the event)
    d[4, 6] = 0.1             # v2a reads row 4 (visual 4): audio 6 is the closest
    assert M.window_search(d, seg, "a2v") == 7
    assert M.window_search(d, seg, "v2a") == 6
    scores = M.window_scores(d, seg, "a2v")
    assert scores.shape == (10,)                       # every start 0..9
    assert scores[7] == 0.0 and scores[0] == 10.0


def test_window_search_length_nine():
    d = big()
    seg = np.arange(1, 10)                             # event seconds 1..9: starts 0 and 1
    # a2v: score(n) = sum_i d[n + i, seg[i]]; make start 0 the best.
    for i in range(9):
        d[0 + i, seg[i]] = 1.0
    assert M.window_scores(d, seg, "a2v").tolist() == [9.0, 90.0]
    assert M.window_search(d, seg, "a2v") == 0
    # v2a: score(n) = sum_i d[seg[i], n + i]; diagonal from (1,1) .. (9,9) favours start 1.
    d2 = big()
    for i in range(9):
        d2[seg[i], 1 + i] = 0.0
    assert M.window_scores(d2, seg, "v2a").tolist() == [90.0, 0.0]
    assert M.window_search(d2, seg, "v2a") == 1


def test_window_search_ties_first_start_wins():
    """Documented behaviour: equal window scores -> the earliest start (numpy argmin)."""
    d = np.ones((10, 10))
    seg = np.array([5, 6, 7])
    assert M.window_search(d, seg, "a2v") == 0
    assert M.window_search(d, seg, "v2a") == 0
    d[3:, :] = 0.0             # visual 3..9 all equally close: starts 3..7 tie for a2v
    assert M.window_search(d, seg, "a2v") == 3
    with pytest.raises(ValueError):
        M.window_search(d, seg, "sideways")


def test_cross_modal_localization_hand_computed():
    T = 10
    dists, masks = [], []
    # Video A: event 2..4 (l = 3), perfect diagonal -> both directions hit.
    d = big()
    np.fill_diagonal(d, 0.0)
    m = np.zeros(T)
    m[2:5] = 1
    dists.append(d)
    masks.append(m)
    # Video B: event 6..6 (l = 1); a2v finds visual 0 (miss), v2a finds audio 6 (hit).
    d = big()
    d[0, 6] = 0.0
    d[6, 6] = 1.0
    m = np.zeros(T)
    m[6] = 1
    dists.append(d)
    masks.append(m)
    # Video C: full-length event -> skipped. Video D: no event -> skipped.
    dists += [np.zeros((T, T)), np.zeros((T, T))]
    masks += [np.ones(T), np.zeros(T)]
    out = M.cross_modal_localization(np.stack(dists), np.stack(masks))
    assert out["evaluated_videos"] == 2
    assert out["a2v_accuracy"] == pytest.approx(50.0)
    assert out["v2a_accuracy"] == pytest.approx(100.0)
    # Chance: one start in (T - l + 1), averaged over evaluated videos, in percent.
    assert out["chance_accuracy"] == pytest.approx(100 * (1 / 8 + 1 / 10) / 2)
    # Coverage: A a2v 1, B a2v 0 -> 0.5; v2a 1 and 1.
    assert out["a2v_coverage"] == pytest.approx(0.5)
    assert out["v2a_coverage"] == pytest.approx(1.0)


def test_cross_modal_partial_overlap_coverage_and_nothing_to_evaluate():
    d = big()
    m = np.zeros(10)
    m[4:8] = 1                                  # l = 4, true start 4
    for i in range(4):
        d[5 + i, 4 + i] = 0.0                   # a2v window starting at 5 (3 of 4 seconds overlap)
    out = M.cross_modal_localization(d[None], m[None])
    assert out["a2v_accuracy"] == 0.0
    assert out["a2v_coverage"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="no video"):
        M.cross_modal_localization(np.zeros((2, 10, 10)), np.stack([np.ones(10), np.zeros(10)]))
