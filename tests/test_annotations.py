"""Annotation parsing on the real AVE metadata, per-segment labels, and error messages."""
from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest

from avel.data.annotations import parse_annotations, read_categories, segment_labels
from avel.data.errors import DataError

BAD = b"\xe9"
HEADER = "Category&VideoID&Quality&StartTime&EndTime\n"


@pytest.fixture(scope="module")
def ann(ave_dir):
    return parse_annotations(ave_dir / "Annotations.txt")


# --- the real files --------------------------------------------------------------------------------

def test_real_annotations_rows_and_categories(ann, ave_dir):
    assert len(ann) == 4143
    assert len(ann.categories) == 28
    assert ann.num_classes == 29
    assert ann.background == 28
    assert ann.class_names[-1] == "background" and len(ann.class_names) == 29
    # Class order = categories.txt order = order of first appearance in Annotations.txt.
    assert list(ann.categories) == read_categories(ave_dir / "categories.txt")
    first_seen = list(dict.fromkeys(line.split("&")[0] for line in
                                    (ave_dir / "Annotations.txt").read_text().splitlines() if line.strip()))
    assert list(ann.categories) == first_seen
    # Rows keep file order, 0-based; line numbers are 1-based (no header in the release file).
    assert [a.row for a in ann.rows[:5]] == [0, 1, 2, 3, 4]
    assert ann.rows[0].line == 1
    assert len({a.video_id for a in ann.rows}) == 4097


def test_real_class_indices_match_official_video_labels(ann, ave_dir):
    with h5py.File(ave_dir / "mil_labels.h5", "r") as f:
        mil = f["avadataset"][()]
    assert mil.shape == (len(ann), ann.num_classes)
    np.testing.assert_array_equal(mil.argmax(1), ann.class_indices())


def test_real_segment_labels_match_official_event_mask(ann, ave_dir):
    """[Start, End) spans reproduce labels_closs.h5 (1 inside the event) for every row."""
    labels = ann.segment_labels()
    assert labels.shape == (4143, 10, 29) and labels.dtype == np.float32
    np.testing.assert_array_equal(labels.sum(-1), 1.0)
    with h5py.File(ave_dir / "labels_closs.h5", "r") as f:
        closs = f["avadataset"][()]
    inside = (labels.argmax(-1) != ann.background).astype(np.float32)
    np.testing.assert_array_equal(inside, closs)


def test_real_empty_span_row_is_all_background(ann):
    empty = [a for a in ann.rows if a.start == a.end]
    assert len(empty) == 1
    a = empty[0]
    assert a.start == a.end == 0
    labels = ann.segment_labels()[a.row]
    assert (labels.argmax(-1) == ann.background).all()
    assert labels[:, ann.background].sum() == 10


def test_real_split_files_parse_with_full_category_list(ann, ave_dir):
    total = 0
    for split in ("train", "val", "test"):
        s = parse_annotations(ave_dir / f"{split}Set.txt", list(ann.categories))
        assert s.categories == ann.categories
        assert s.num_classes == 29
        with h5py.File(ave_dir / f"{split}_order.h5", "r") as f:
            order = f["order"][()].reshape(-1)
        assert len(s) == len(order)
        # Split file row k is Annotations.txt row order[k].
        assert [a.video_id for a in s.rows] == [ann.rows[i].video_id for i in order]
        np.testing.assert_array_equal(s.class_indices(), ann.class_indices()[order])
        total += len(s)
    assert total == len(ann)


def test_split_file_alone_has_its_own_first_appearance_order(ave_dir, ann):
    s = parse_annotations(ave_dir / "testSet.txt")
    assert set(s.categories) <= set(ann.categories)
    # With the full list the indices are those of the full file, whatever the split's order.
    full = parse_annotations(ave_dir / "testSet.txt", list(ann.categories))
    idx = {c: i for i, c in enumerate(ann.categories)}
    assert list(full.class_indices()) == [idx[a.category] for a in full.rows]


# --- header and label building ---------------------------------------------------------------------

def test_header_line_is_skipped_and_lines_counted(tmp_path, ave_dir):
    body = (ave_dir / "Annotations.txt").read_text().splitlines(keepends=True)[:50]
    plain, headed = tmp_path / "plain.txt", tmp_path / "headed.txt"
    plain.write_text("".join(body))
    headed.write_text(HEADER + "".join(body))
    a, b = parse_annotations(plain), parse_annotations(headed)
    assert len(a) == len(b) == 50
    assert [(r.category, r.video_id, r.start, r.end) for r in a.rows] == \
           [(r.category, r.video_id, r.start, r.end) for r in b.rows]
    assert b.rows[0].row == 0 and b.rows[0].line == 2       # line numbers count the header
    np.testing.assert_array_equal(a.segment_labels(), b.segment_labels())


def test_utf8_bom_and_crlf_and_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"Dog&v1&good&0&3\r\n\r\nCat&v2&good&2&5\r\n")
    a = parse_annotations(p)
    assert [r.video_id for r in a.rows] == ["v1", "v2"]
    assert a.categories == ("Dog", "Cat")


def test_segment_labels_half_open_spans(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("Dog&v1&good&2&5\nCat&v2&good&0&10\nDog&v3&good&7&7\nCat&v4&good&9&10\nDog&v5&good&0&1\n")
    a = parse_annotations(p)
    lab = segment_labels(a, 10)
    ids = lab.argmax(-1)
    bg = a.background
    assert a.categories == ("Dog", "Cat") and bg == 2
    assert ids[0].tolist() == [bg, bg, 0, 0, 0, bg, bg, bg, bg, bg]      # [2, 5): seconds 2, 3, 4
    assert ids[1].tolist() == [1] * 10
    assert ids[2].tolist() == [bg] * 10                                    # Start = End: no event
    assert ids[3].tolist() == [bg] * 9 + [1]
    assert ids[4].tolist() == [0] + [bg] * 9
    # One-hot: exactly one 1 per segment.
    assert set(np.unique(lab)) == {0.0, 1.0}
    np.testing.assert_array_equal(lab.sum(-1), 1.0)
    # Fewer segments than the span: clipped, never an error.
    short = segment_labels(a, 4).argmax(-1)
    assert short[0].tolist() == [bg, bg, 0, 0]


# --- errors name the file and the line -------------------------------------------------------------

def _expect_error(path, *needles):
    with pytest.raises(DataError) as e:
        parse_annotations(path)
    msg = str(e.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "bad.txt"
    raw = b"Dog&v1&good&0&3\nDog&v2&good&1&4\nCaf\xe9&v3&good&0&2\n"
    p.write_bytes(raw)
    _expect_error(p, "line 3", "UTF-8", f"byte {raw.index(BAD)}")
    # With a BOM the byte offset still points at the bad byte of the file.
    raw = b"\xef\xbb\xbf" + raw
    p.write_bytes(raw)
    _expect_error(p, "line 3", f"byte {raw.index(BAD)}")


def test_wrong_field_count(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("Dog&v1&good&0&3\nDog&v2&good&1\n")
    _expect_error(p, "line 2", "5 fields", "got 4")
    p.write_text(HEADER + "Dog&v1&good&0&3\nDog&v2&good&1&4&9\n")
    _expect_error(p, "line 3", "got 6")


def test_non_integer_start(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("Dog&v1&good&0&3\nDog&v2&good&1.5&4\n")
    _expect_error(p, "line 2", "'1.5'")
    p.write_text("Dog&v1&good&x&3\n")
    _expect_error(p, "line 1", "'x'")


def test_end_before_start(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("Dog&v1&good&0&3\nDog&v2&good&6&4\n")
    _expect_error(p, "line 2", "Start=6", "End=4")


def test_negative_start_and_empty_fields(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("Dog&v1&good&-1&3\n")
    _expect_error(p, "line 1")
    p.write_text("Dog&v1&good&0&3\n&v2&good&0&3\n")
    _expect_error(p, "line 2", "empty")


def test_missing_and_empty_file(tmp_path):
    _expect_error(tmp_path / "nope.txt", "not found")
    p = tmp_path / "empty.txt"
    p.write_text(HEADER + "\n")
    _expect_error(p, "no annotation rows")


def test_split_category_not_in_class_list(tmp_path, ann):
    p = tmp_path / "split.txt"
    p.write_text(f"{ann.categories[0]}&v1&good&0&3\nUnicorn&v2&good&0&3\n")
    msg = _expect_error_with(p, list(ann.categories))
    assert "Unicorn" in msg


def _expect_error_with(path, categories):
    with pytest.raises(DataError) as e:
        parse_annotations(path, categories)
    assert str(path) in str(e.value)
    return str(e.value)


def test_duplicate_ids_are_rows_not_errors(ann):
    counts = Counter(a.video_id for a in ann.rows)
    dup = [k for k, v in counts.items() if v > 1]
    assert dup, "the release has videos with two events (two rows)"
    rows = [a for a in ann.rows if a.video_id == dup[0]]
    assert len(rows) >= 2
