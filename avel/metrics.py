"""Metrics as pure numpy functions.

The official AVE score is *segment accuracy*: over every segment of every video of a split,
the fraction where argmax(prediction) == argmax(one-hot target), background included.
"""
from __future__ import annotations

import numpy as np


def _flat_classes(x: np.ndarray) -> np.ndarray:
    """[..., C] scores/one-hot -> [...] class ids; integer arrays are taken as ids already."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        return x.reshape(-1)
    return x.argmax(-1).reshape(-1)


def segment_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """pred, target: [N, T, C] scores / one-hot (or [N, T] class ids). Fraction in [0, 1]."""
    p, t = _flat_classes(pred), _flat_classes(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} segments, target {t.size}")
    if p.size == 0:
        raise ValueError("no segments to score")
    return float((p == t).mean())


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts; row = true class, column = predicted class."""
    p, t = _flat_classes(pred), _flat_classes(target)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each true class from a confusion matrix; NaN for classes with no segment."""
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def video_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """pred [N, C] scores, target [N, C] one-hot (or ids): fraction of videos whose class is right."""
    return segment_accuracy(np.asarray(pred)[:, None], np.asarray(target)[:, None])


def spans(classes: np.ndarray, background: int) -> list[tuple[int, int, int]]:
    """Merge runs of equal non-background classes: [T] ids -> [(start, end_exclusive, class)]."""
    out: list[tuple[int, int, int]] = []
    classes = np.asarray(classes).reshape(-1)
    start = 0
    for t in range(1, len(classes) + 1):
        if t == len(classes) or classes[t] != classes[start]:
            if classes[start] != background:
                out.append((start, t, int(classes[start])))
            start = t
    return out


def event_metrics(pred: np.ndarray, target: np.ndarray, background: int, iou: float = 0.5) -> dict[str, float]:
    """Event-level precision / recall / F1: a predicted span is a hit when it has the class of an
    unmatched true span and temporal IoU >= ``iou`` with it (one-to-one, greedy by IoU)."""
    p_ids = np.asarray(pred).argmax(-1) if np.asarray(pred).ndim == 3 else np.asarray(pred)
    t_ids = np.asarray(target).argmax(-1) if np.asarray(target).ndim == 3 else np.asarray(target)
    hits = n_pred = n_true = 0
    for p_row, t_row in zip(p_ids, t_ids):
        ps, ts = spans(p_row, background), spans(t_row, background)
        n_pred += len(ps)
        n_true += len(ts)
        pairs = []
        for i, (ps0, ps1, pc) in enumerate(ps):
            for j, (ts0, ts1, tc) in enumerate(ts):
                if pc != tc:
                    continue
                inter = max(0, min(ps1, ts1) - max(ps0, ts0))
                union = max(ps1, ts1) - min(ps0, ts0)
                if inter / union >= iou:
                    pairs.append((inter / union, i, j))
        used_p, used_t = set(), set()
        for _, i, j in sorted(pairs, reverse=True):
            if i not in used_p and j not in used_t:
                used_p.add(i)
                used_t.add(j)
                hits += 1
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"event_precision": precision, "event_recall": recall, "event_f1": f1}


def summarize(pred: np.ndarray, target: np.ndarray, class_names: list[str]) -> dict:
    """Everything `avel evaluate --json` reports for segment predictions [N, T, C]."""
    c = len(class_names)
    cm = confusion_matrix(pred, target, c)
    pcs = per_class_accuracy(cm)
    background = c - 1
    return {
        "accuracy": segment_accuracy(pred, target),
        "segments": int(cm.sum()),
        "videos": int(np.asarray(pred).shape[0]),
        "per_class_accuracy": {n: (None if np.isnan(a) else float(a)) for n, a in zip(class_names, pcs)},
        "confusion_matrix": cm.tolist(),
        **event_metrics(pred, target, background),
    }


# --- cross-modality localization (A2V / V2A) -------------------------------------------------

def window_search(dist: np.ndarray, seg: np.ndarray, direction: str) -> int:
    """Best start of a length-l window, given the pairwise distances of one video.

    dist [T, T]: dist[i, j] = d(visual second i, audio second j). seg: the event's seconds
    (ascending, length l). A2V: score(n) = sum_i d(visual[n+i], audio[seg[i]]);
    V2A: score(n) = sum_i d(visual[seg[i]], audio[n+i]). Returns argmin start (first on ties).
    """
    return int(np.argmin(window_scores(dist, seg, direction)))


def window_scores(dist: np.ndarray, seg: np.ndarray, direction: str) -> np.ndarray:
    T = dist.shape[0]
    l = len(seg)
    starts = np.arange(T - l + 1)[:, None] + np.arange(l)[None, :]      # [S, l] searched seconds
    if direction == "a2v":
        return dist[starts, np.asarray(seg)[None, :]].sum(1)
    if direction == "v2a":
        return dist[np.asarray(seg)[None, :], starts].sum(1)
    raise ValueError(f"direction must be 'a2v' or 'v2a', not {direction!r}")


def cross_modal_localization(dists: np.ndarray, event_mask: np.ndarray) -> dict[str, float]:
    """dists [N, T, T] (visual x audio), event_mask [N, T] (1 inside the event).

    Videos whose event fills every second (or has none) are skipped, as in the original
    protocol. Returns A2V and V2A accuracy (percent of evaluated videos), the fraction of event
    seconds covered by the predicted window, the evaluated count and the chance rate of the search.
    """
    hits = {"a2v": 0, "v2a": 0}
    cover = {"a2v": 0.0, "v2a": 0.0}
    chance = 0.0
    evaluated = 0
    for dist, mask in zip(np.asarray(dists), np.asarray(event_mask)):
        seg = np.flatnonzero(mask > 0)
        T = len(mask)
        if len(seg) == 0 or len(seg) == T:
            continue
        evaluated += 1
        chance += 1.0 / (T - len(seg) + 1)
        for direction in ("a2v", "v2a"):
            n = window_search(dist, seg, direction)
            hits[direction] += int(n == seg[0])
            cover[direction] += len(np.intersect1d(np.arange(n, n + len(seg)), seg)) / len(seg)
    if evaluated == 0:
        raise ValueError("no video with a partial-length event to evaluate")
    return {
        "a2v_accuracy": 100.0 * hits["a2v"] / evaluated,
        "v2a_accuracy": 100.0 * hits["v2a"] / evaluated,
        "a2v_coverage": cover["a2v"] / evaluated,
        "v2a_coverage": cover["v2a"] / evaluated,
        "chance_accuracy": 100.0 * chance / evaluated,
        "evaluated_videos": evaluated,
    }
