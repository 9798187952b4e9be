"""Which videos to extract, in which rows: folders, file lists, single files, or an AVE ``Annotations.txt``.

A folder gives its video files, sorted by name; a text list one path per line (relative to the list's
folder; blank lines and ``#`` comments skipped); an ``Annotations.txt`` (``Category&VideoID&Quality&Start&End``)
names ``<video_dir>/<id>.<ext>`` (``.mp4`` preferred, any extension found). Rows keep the input order; a
video id in two annotation rows is one video written to both rows.
"""
from __future__ import annotations

import dataclasses
import logging
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


def _is_video_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


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
        if not p.is_file() or p.name.startswith("."):
            continue
        r = rank.get(p.suffix.lower(), len(rank))
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
            for p in sorted((p for p in src.iterdir() if _is_video_file(p)), key=lambda p: p.name):
                items.append(VideoItem(len(items), p.stem, str(p.resolve())))
        elif src.is_file() and src.suffix.lower() in VIDEO_EXTENSIONS:
            kinds.append("file")
            items.append(VideoItem(len(items), src.stem, str(src.resolve())))
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
            for line in src.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                p = p if p.is_absolute() else base / p
                items.append(VideoItem(len(items), p.stem, str(p.resolve()) if p.exists() else str(p)))
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
