"""AVE annotation files: parse, validate, categories, per-segment labels.

``Annotations.txt`` lines are ``Category&VideoID&Quality&Start&End`` (an optional header line is
skipped). Row i of every official feature/label file is line i of this file. The class index of
a category is the order of its first appearance; background is the last index (28 for AVE).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from ..layout import CATEGORIES
from .errors import DataError

HEADER_FIRST_FIELD = {"category", "event", "class"}


@dataclass(frozen=True)
class Annotation:
    row: int           # 0-based row in Annotations.txt (header not counted)
    line: int          # 1-based line number in the file (for messages)
    category: str
    video_id: str
    quality: str
    start: int         # event span [start, end) in whole seconds
    end: int


@dataclass(frozen=True)
class AnnotationSet:
    path: Path
    rows: tuple[Annotation, ...]
    categories: tuple[str, ...]     # event classes in first-appearance order (background excluded)

    @property
    def num_classes(self) -> int:
        """Event classes plus background."""
        return len(self.categories) + 1

    @property
    def background(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [*self.categories, "background"]

    def __len__(self) -> int:
        return len(self.rows)

    def segment_labels(self, segments: int = 10) -> np.ndarray:
        """One-hot per-segment targets [N, T, C] built from the spans (float32)."""
        return segment_labels(self, segments)

    def class_indices(self) -> np.ndarray:
        """Event class index of every row [N] (int64)."""
        index = {c: i for i, c in enumerate(self.categories)}
        return np.array([index[a.category] for a in self.rows], dtype=np.int64)


def read_lines(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # utf-8-sig reports positions after a leading BOM: count it back for the byte offset.
        pos = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:pos].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte {pos})") from None
    return text.splitlines()


def parse_annotations(path: str | Path, categories: list[str] | None = None) -> AnnotationSet:
    """Parse an AVE annotation file (Annotations.txt or a split file such as testSet.txt).

    ``categories`` fixes the class order (e.g. from the full Annotations.txt when parsing a split
    file); by default it is the order of first appearance in this file.
    """
    path = Path(path)
    lines = read_lines(path)
    rows: list[Annotation] = []
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        fields = text.split("&")
        if not rows and fields[0].strip().lower() in HEADER_FIRST_FIELD:
            continue  # header line
        if len(fields) != 5:
            raise DataError(f"{path}: line {lineno}: expected 5 fields 'Category&VideoID&Quality&Start&End', "
                            f"got {len(fields)}: {text[:80]!r}")
        category, vid, quality, start_s, end_s = (f.strip() for f in fields)
        try:
            start, end = int(start_s), int(end_s)
        except ValueError:
            raise DataError(f"{path}: line {lineno}: Start/End must be whole seconds, got {start_s!r}/{end_s!r}") from None
        if not category or not vid:
            raise DataError(f"{path}: line {lineno}: empty category or video id")
        if start < 0 or end < start:
            raise DataError(f"{path}: line {lineno}: invalid span Start={start} End={end}")
        rows.append(Annotation(len(rows), lineno, category, vid, quality, start, end))
    if not rows:
        raise DataError(f"{path}: no annotation rows")
    seen: dict[str, None] = {}
    for a in rows:
        seen.setdefault(a.category, None)
    if categories is None:
        categories = list(seen)
    else:
        missing = [c for c in seen if c not in categories]
        if missing:
            raise DataError(f"{path}: categories not in the class list: {missing}")
    return AnnotationSet(path, tuple(rows), tuple(categories))


def read_categories(path: str | Path) -> list[str]:
    return [line.strip() for line in read_lines(Path(path)) if line.strip()]


@functools.lru_cache(maxsize=1)
def ave_categories() -> tuple[str, ...]:
    """The 28 AVE categories in the official class order (= categories.txt of the release)."""
    text = files("avel").joinpath("resources/ave_categories.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def class_order(root: str | Path, seen: list[str]) -> list[str] | None:
    """The class list of a data folder: its ``categories.txt``, else the AVE order when every category
    is an AVE one (so a subset of the release keeps the official indices), else None (first appearance)."""
    path = Path(root) / CATEGORIES
    if path.is_file():
        return read_categories(path)
    if seen and set(seen) <= set(ave_categories()):
        return list(ave_categories())
    return None


def segment_labels(annotations: AnnotationSet, segments: int = 10) -> np.ndarray:
    """[N, T, C] one-hot: the event class inside [Start, End), background elsewhere.

    A row with Start = End (one exists in AVE) has no event second and is all background.
    """
    n, c = len(annotations), annotations.num_classes
    labels = np.zeros((n, segments, c), dtype=np.float32)
    labels[:, :, annotations.background] = 1.0
    cls = annotations.class_indices()
    for i, a in enumerate(annotations.rows):
        lo, hi = min(a.start, segments), min(a.end, segments)
        labels[i, lo:hi, :] = 0.0
        labels[i, lo:hi, cls[i]] = 1.0
    return labels
