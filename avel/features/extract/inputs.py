"""Which videos to extract, in which rows: folders, file lists, single files, or an AVE ``Annotations.txt``.

A folder gives its video files, sorted by name; a text list one path per line (relative to the list's
folder; blank lines and ``#`` comments skipped); an ``Annotations.txt`` (``Category&VideoID&Quality&Start&End``)
names ``<video_dir>/<id>.<ext>`` (``.mp4`` preferred, any extension found). Rows keep the input order; a
video id in two annotation rows is one video written to both rows.

Every video named or found gets a row, even one that cannot be read: in a folder, every entry with a
video extension (hidden names aside) -- a folder called ``x.mp4``, a broken link, a fifo -- is a row,
and so is every line of a list and every video path on the command line (a broken link, or a missing
path with a video extension). Such a row fails when it is extracted, with a one-line reason naming the
file (:func:`avel.features.decode.file_problem`); the other rows are extracted. Only an input that is
no video, folder, list or annotation file at all (a mistyped folder) stops the collection.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...data.annotations import parse_annotations, read_lines
from ...data.errors import DataError
from ...layout import VIDEO_FOLDER

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp",
                    ".ogv", ".ts", ".wmv", ".m2ts", ".mts")


@dataclass(frozen=True)
class VideoItem:
    """One row of the output: ``path`` None when the video was not found (the row is then failed)."""

    row: int
    video_id: str
    path: str | None
    annotation: str | None = None     # the raw Annotations.txt line of this row, when the input was one


def _is_video_name(p: Path) -> bool:
    """A folder entry that is meant as a video: a video extension, not hidden (whatever it is on disk)."""
    return p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


def _row_path(p: Path) -> str:
    """The path a row records: resolved for a file that is there, the absolute (unresolved) path of a
    broken link or a missing file, so that the manifest names what was given."""
    return str(p.resolve()) if p.exists() else os.path.abspath(p)


def _is_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return True       # let the reader say what is wrong
    return b"\0" not in head


def _looks_like_annotations(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    return len(line.split("&")) == 5
    except OSError:
        return False
    return False


def _index_folder(folder: Path) -> dict[str, Path]:
    """stem -> file; ``.mp4`` wins, then the order of VIDEO_EXTENSIONS, then any other extension."""
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
    best: dict[str, tuple[int, Path]] = {}
    if not folder.is_dir():
        return {}
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file():
            r = rank.get(p.suffix.lower(), len(rank))
        elif p.suffix.lower() in rank:       # a folder, a broken link... named as a video: the row says why it fails
            r = 2 * len(rank) + rank[p.suffix.lower()]
        else:
            continue
        if p.stem not in best or r < best[p.stem][0]:
            best[p.stem] = (r, p)
    return {k: v for k, (_, v) in best.items()}


def collect_videos(inputs: str | Path | Sequence[str | Path], *, video_dir: str | Path | None = None
                   ) -> tuple[list[VideoItem], Path | None]:
    """The rows to extract from ``inputs`` (folders, list files, video files, one Annotations.txt).

    Returns ``(items, annotations_path)``; ``annotations_path`` is set when the only input was an
    annotation file (the output then gets a copy of it). For annotations, ``video_dir`` defaults to the
    ``AVE`` folder next to the file when there is one, else the file's own folder.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items: list[VideoItem] = []
    annotations: Path | None = None
    kinds = []
    for raw in inputs:
        src = Path(raw)
        if src.is_dir():
            kinds.append("folder")
            for p in sorted((p for p in src.iterdir() if _is_video_name(p)), key=lambda p: p.name):
                items.append(VideoItem(len(items), p.stem, _row_path(p)))
        elif src.suffix.lower() in VIDEO_EXTENSIONS:
            # a video file, or a video path that is not one (missing, a broken link, a fifo): its row fails
            kinds.append("file")
            items.append(VideoItem(len(items), src.stem, _row_path(src)))
        elif src.is_file() and _looks_like_annotations(src):
            kinds.append("annotations")
            annotations = src.resolve()
            ann = parse_annotations(src)
            lines = read_lines(src)
            folder = Path(video_dir) if video_dir is not None else (
                src.parent / VIDEO_FOLDER if (src.parent / VIDEO_FOLDER).is_dir() else src.parent)
            index = _index_folder(folder)
            for a in ann.rows:
                p = index.get(a.video_id)
                items.append(VideoItem(len(items), a.video_id, str(p.resolve()) if p else None, lines[a.line - 1]))
            missing = sum(1 for it in items if it.path is None)
            if missing:
                log.warning("%s: %d of %d rows have no video in %s", src, missing, len(ann.rows), folder)
        elif src.is_file():
            kinds.append("list")
            base = src.parent
            if not _is_text(src):
                raise DataError(f"{src}: not a video (unknown extension {src.suffix or 'none'}), nor a text list of "
                                f"videos or an Annotations.txt")
            try:
                text = src.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataError(f"{src}: a list of videos must be UTF-8 text ({e.reason} at byte {e.start})") from None
            for line in text.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                p = p if p.is_absolute() else base / p
                items.append(VideoItem(len(items), p.stem, _row_path(p)))
        elif src.is_symlink():
            kinds.append("file")                   # a broken link: a row that fails, naming it
            items.append(VideoItem(len(items), src.stem, _row_path(src)))
        elif src.exists():
            raise DataError(f"{src}: not a file or folder (a fifo, socket or device)")
        else:
            raise DataError(f"{src}: no such file or folder")
    if annotations is not None and len(kinds) > 1:
        annotations = None   # mixed inputs: rows no longer match one annotation file
    if not items:
        raise DataError(f"no videos found in {', '.join(str(i) for i in inputs)}")
    return items, annotations


def as_items(videos: Iterable[VideoItem | str | Path]) -> list[VideoItem]:
    out = []
    for i, v in enumerate(videos):
        if isinstance(v, VideoItem):
            if v.row != i:
                v = dataclasses.replace(v, row=i)
            out.append(v)
        else:
            out.append(VideoItem(i, Path(v).stem, str(v)))
    return out
