"""Video list -> feature store: decoding threads ahead of the CNN, per-video parts, resume, shards, merge.

Inputs (:func:`collect_videos`)
-------------------------------
A folder (its video files, sorted by name), a text list (one path per line, relative to the list's
folder; blank lines and ``#`` comments skipped), a single video file, or an AVE ``Annotations.txt``
(``Category&VideoID&Quality&Start&End``) whose ids name ``<video_dir>/<id>.<ext>`` (``.mp4`` preferred,
any extension found). Rows keep the input order; a video id in two annotation rows is decoded and
extracted once and written to both rows.

Layout of an output folder
--------------------------
``audio_feature.h5`` [N, T, Da], ``visual_feature.h5`` [N, T, gh, gw, Dv], ``visual_feature_vec.h5``
[N, T, Dv] (grid average), each with dataset ``avadataset`` (float32); ``features.json`` (feature spec,
rows, videos, failures); ``manifest.jsonl`` (one JSON object per row: row, video_id, path, status
'ok'|'failed', flags, seconds, duration, error); a copy of ``Annotations.txt`` when the input was one:
the folder is a complete avel data root. ``manifest.jsonl`` is written last: its presence means done.

While running, ``<out>/parts/<row:06d>.npz`` holds each finished row (arrays ``audio``, ``visual`` and
``meta``, the manifest entry as UTF-8 JSON bytes; written to a temporary name and renamed; read with
``allow_pickle=False``) and ``parts/run.json`` the run's identity (backbone specs, T, fps, the rows).
A killed run restarted with the same arguments redoes no finished row and loses none. The parts are
removed once the store is written (``keep_parts=True`` keeps them).

Length policy: every row has ``seconds`` (T) segments. Shorter videos: the visual stream repeats the
last frame, the audio is zero-padded (silence) -- flags ``padded_video`` / ``padded_audio``; longer
videos are cut at T (``truncated``). A video that cannot be decoded at all is recorded as ``failed``
with the error, its row is zeros, and the run goes on. Errors of the backbones are not data errors:
they stop the run (resume picks up after the last finished video).

Sharding: ``num_shards`` N and ``shard_index`` i (default: ``WORLD_SIZE`` / ``RANK`` from the
environment, as set by ``torchrun``). Unique videos are dealt round-robin (video j -> shard j mod N;
strided, so long and short stretches of the list spread evenly, and a duplicated id never lands in
two shards). Shard i writes ``<out>/shard-<i>-of-<N>/``, a complete store of its rows (with its own
manifest and Annotations subset); :func:`merge_shards` joins them into ``<out>/`` in the original row
order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np
import torch

from ..data.errors import DataError
from ..data.store import H5_KEY, SPEC_FILE, write_spec
from .decode import DecodedVideo, VideoDecodeError, VideoStream, decode_video
from .spec import FeatureSpec, StreamSpec

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp",
                    ".ogv", ".ts", ".wmv", ".m2ts", ".mts")
MANIFEST = "manifest.jsonl"
PARTS = "parts"
RUN_FILE = "run.json"
AUDIO_FILE, VISUAL_FILE, VISUAL_VEC_FILE = "audio_feature.h5", "visual_feature.h5", "visual_feature_vec.h5"
ANNOTATIONS = "Annotations.txt"
_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


# ---------------------------------------------------------------------------------------------- inputs

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
            from ..data.annotations import parse_annotations, read_lines

            kinds.append("annotations")
            annotations = src.resolve()
            ann = parse_annotations(src)
            lines = read_lines(src)
            folder = Path(video_dir) if video_dir is not None else (
                src.parent / "AVE" if (src.parent / "AVE").is_dir() else src.parent)
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


def _as_items(videos: Iterable[VideoItem | str | Path]) -> list[VideoItem]:
    out = []
    for i, v in enumerate(videos):
        if isinstance(v, VideoItem):
            if v.row != i:
                v = dataclasses.replace(v, row=i)
            out.append(v)
        else:
            out.append(VideoItem(i, Path(v).stem, str(v)))
    return out


# ---------------------------------------------------------------------------------------------- one video

@dataclass
class VideoFeatures:
    audio: np.ndarray      # float32 [T, Da]
    visual: np.ndarray     # float32 [T, gh, gw, Dv] ([T, Dv] for vector backbones)
    flags: dict            # decode flags (see avel.features.decode), only those set
    duration: float        # of the file, seconds

    @property
    def seconds(self) -> int:
        return int(self.audio.shape[0])


def _frame_size(visual_backbone, frame_size):
    """'auto': the backbone's ``input_size`` (height, width) or square ``image_size``, else the source size."""
    if isinstance(frame_size, str):
        if frame_size != "auto":
            raise ValueError(f"frame_size must be 'auto', None or (height, width), not {frame_size!r}")
        size = getattr(visual_backbone, "input_size", None) or getattr(visual_backbone, "image_size", None)
        return (size, size) if isinstance(size, int) else size
    return frame_size


def _sample_rate(audio_backbone) -> int:
    return int(getattr(getattr(audio_backbone, "spec", None), "sample_rate", 0) or 16000)


DEFAULT_CHUNK_SECONDS = 30   # seconds of frames decoded ahead of the visual backbone (memory bound, not results)


class _VisualSums:
    """Per-second sums of the visual backbone's outputs over frames fed in order, in pieces of any size.

    The backbone always runs on batches of ``batch_frames`` consecutive frames counted from the first
    frame of the video (the last batch shorter), whatever pieces the frames arrive in, so the features
    are the same bit for bit however the video is chunked. Holds at most ``batch_frames - 1`` frames
    between calls of :meth:`add` (views of the pieces fed).
    """

    def __init__(self, backbone, fps: int, batch_frames: int):
        self.backbone, self.fps, self.batch = backbone, int(fps), max(1, int(batch_frames))
        self.pieces: deque[np.ndarray] = deque()
        self.held = 0         # frames in ``pieces``
        self.done = 0         # frames run through the backbone
        self.sums: list[np.ndarray] = []

    def add(self, *pieces: np.ndarray) -> None:
        for frames in pieces:
            if len(frames):
                self.pieces.append(frames)
                self.held += len(frames)
            while self.held >= self.batch:
                self._run(self._take(self.batch))

    def finish(self, seconds: int) -> np.ndarray:
        if self.held:
            self._run(self._take(self.held))
        if len(self.sums) != seconds or self.done != seconds * self.fps:
            raise RuntimeError(f"visual features of {len(self.sums)} s ({self.done} frames) for a {seconds} s video")
        return (np.stack(self.sums) / self.fps).astype(np.float32)

    def _take(self, n: int) -> np.ndarray:
        first = self.pieces[0]
        if len(first) >= n:                      # a view: no copy when a piece holds the whole batch
            batch = first[:n]
            if len(first) > n:
                self.pieces[0] = first[n:]
            else:
                self.pieces.popleft()
        else:
            parts, need = [], n
            while need:
                p = self.pieces[0]
                if len(p) <= need:
                    parts.append(self.pieces.popleft())
                    need -= len(p)
                else:
                    parts.append(p[:need])
                    self.pieces[0] = p[need:]
                    need = 0
            batch = np.concatenate(parts)
        self.held -= n
        return batch

    def _run(self, batch: np.ndarray) -> None:
        out = self.backbone(batch)
        out = out.detach().to("cpu", torch.float32).numpy() if isinstance(out, torch.Tensor) \
            else np.asarray(out, dtype=np.float32)
        sec = (self.done + np.arange(len(out))) // self.fps
        for s in np.unique(sec):
            while len(self.sums) <= s:
                self.sums.append(np.zeros(out.shape[1:], np.float64))
            self.sums[s] += out[sec == s].sum(0, dtype=np.float64)
        self.done += len(batch)


def _video_features(visual: np.ndarray, waveform: np.ndarray, T: int, audio_backbone, flags: dict,
                    duration: float) -> VideoFeatures:
    audio = audio_backbone(waveform, T)
    audio = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim != 2 or audio.shape[0] != T:
        raise ValueError(f"audio backbone returned shape {audio.shape}, expected [{T}, dim]")
    if not (np.isfinite(audio).all() and np.isfinite(visual).all()):
        flags["nonfinite"] = True
    return VideoFeatures(audio, visual, flags, duration)


def features_of(decoded: DecodedVideo, *, audio_backbone, visual_backbone, batch_frames: int = 64) -> VideoFeatures:
    """Run the backbones on a decoded video: per-second means of the frame maps, audio per second."""
    T, fps = decoded.seconds, decoded.fps
    sums = _VisualSums(visual_backbone, fps, batch_frames)
    with torch.inference_mode():
        sums.add(decoded.frames)
        visual = sums.finish(T)
        return _video_features(visual, decoded.waveform, T, audio_backbone, decoded.active_flags(), decoded.duration)


def _chunks(stream: VideoStream, chunk_seconds: int | None) -> Iterator[list[np.ndarray]]:
    """The per-second frame arrays of ``stream``, ``chunk_seconds`` seconds per list (None: one list)."""
    step = None if chunk_seconds is None else int(chunk_seconds)
    if step is not None and step < 1:
        raise ValueError(f"chunk_seconds must be >= 1 or None, got {chunk_seconds}")
    chunk: list[np.ndarray] = []
    for _, frames, _ in stream:
        chunk.append(frames)
        del frames
        if step is not None and len(chunk) >= step:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stream_features(chunks: Iterable[list[np.ndarray]], source, *, audio_backbone, visual_backbone, fps: int,
                     batch_frames: int) -> VideoFeatures:
    """Features from the chunks of one video; ``source.stream`` (or ``source``) is its finished VideoStream."""
    sums = _VisualSums(visual_backbone, fps, batch_frames)
    with torch.inference_mode():
        for chunk in chunks:
            sums.add(*chunk)
            del chunk
        stream = getattr(source, "stream", source)
        visual = sums.finish(stream.seconds)
        return _video_features(visual, stream.waveform, stream.seconds, audio_backbone, stream.active_flags(),
                               stream.duration)


def extract_video(path: str | Path, *, audio_backbone, visual_backbone, seconds: int | None = None, fps: int = 16,
                  batch_frames: int = 64, frame_size="auto",
                  chunk_seconds: int | None = DEFAULT_CHUNK_SECONDS) -> VideoFeatures:
    """Features of one video of any length (``seconds`` None: its whole seconds). Raises
    :class:`~avel.features.decode.VideoDecodeError` when the file cannot be decoded.

    ``frame_size``: 'auto' resizes frames while decoding (swscale bilinear, aspect not kept) to the visual
    backbone's ``input_size`` (height, width) or ``image_size`` (square) when it has one, so the backbone's
    own resize is a no-op and decoded clips stay small; None keeps the source size (the backbone resizes);
    or an explicit (height, width).

    The video is decoded in one streaming pass, ``chunk_seconds`` seconds of frames at a time, each chunk
    run through the visual backbone before the next is decoded: at most about ``chunk_seconds * fps +
    batch_frames`` frames are held, however long the video (None: all frames at once). The features do
    not depend on ``chunk_seconds`` (the backbone batches are the same).
    """
    with VideoStream(path, fps=fps, seconds=seconds, sample_rate=_sample_rate(audio_backbone),
                     size=_frame_size(visual_backbone, frame_size)) as stream:
        return _stream_features(_chunks(stream, chunk_seconds), stream, audio_backbone=audio_backbone,
                                visual_backbone=visual_backbone, fps=stream.fps, batch_frames=batch_frames)


class _DecodeFailure(Exception):
    """Decoding (not the backbones) failed: ``error`` is the original exception."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _Prefetch:
    """One video decoded ahead of the CNN: :meth:`run` (in a pool thread) puts its chunks in a bounded queue
    that :meth:`chunks` (the calling thread) takes from; without a pool, :meth:`chunks` decodes inline.
    Decoding errors come out of :meth:`chunks` as :class:`_DecodeFailure`; ``stream`` is the finished
    VideoStream once the chunks are exhausted."""

    def __init__(self, open_stream, chunk_seconds: int | None, threaded: bool, depth: int = 1):
        self._open = open_stream
        self._chunk_seconds = chunk_seconds
        self._threaded = threaded
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.stream: VideoStream | None = None

    def run(self) -> None:
        try:
            with self._open() as stream:
                for chunk in _chunks(stream, self._chunk_seconds):
                    if not self._put(("chunk", chunk)):
                        return
                    del chunk
            self._put(("end", stream))
        except BaseException as e:  # noqa: BLE001 - passed on to the consumer
            self._put(("error", e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def cancel(self) -> None:
        self._stop.set()

    def chunks(self) -> Iterator[list[np.ndarray]]:
        if not self._threaded:
            yield from self._inline()
            return
        while True:
            kind, value = self._q.get()
            if kind == "chunk":
                yield value
                del value
            elif kind == "end":
                self.stream = value
                return
            elif isinstance(value, Exception):
                raise _DecodeFailure(value)
            else:
                raise value

    def _inline(self) -> Iterator[list[np.ndarray]]:
        try:
            stream = self._open()
        except Exception as e:  # noqa: BLE001
            raise _DecodeFailure(e) from e
        with stream:
            it = _chunks(stream, self._chunk_seconds)
            while True:
                try:
                    chunk = next(it)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001
                    raise _DecodeFailure(e) from e
                yield chunk
                del chunk
        self.stream = stream


# ---------------------------------------------------------------------------------------------- results

@dataclass
class ExtractResult:
    out_dir: Path            # the store written (the shard folder when sharded)
    rows: int                # rows in this store
    videos: int              # unique videos in this store
    processed: int           # videos decoded and extracted by this call
    resumed: int             # videos already finished by an earlier call
    failed: int              # failed rows
    flagged: int             # rows with any flag (padding, truncation, corrupt packets, failure...)
    video_seconds: float     # seconds of video (T per video) extracted by this call
    wall_seconds: float
    finalized: bool          # the h5 files, features.json and manifest.jsonl are written
    num_shards: int = 1
    shard_index: int = 0
    merged_from: int = 0     # shards joined, for a merge_shards result

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST

    @property
    def rate(self) -> float:
        """Video-seconds extracted per wall-second in this call."""
        return self.video_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        if self.merged_from:
            return (f"{self.out_dir}: merged {self.merged_from} shards: {self.rows} rows ({self.videos} videos), "
                    f"{self.failed} failed, {self.flagged} flagged")
        return (f"{self.out_dir}: {self.rows} rows ({self.videos} videos), {self.processed} extracted now, "
                f"{self.resumed} resumed, {self.failed} failed, {self.flagged} flagged; "
                f"{self.video_seconds:.0f} video-s in {self.wall_seconds:.1f} s ({self.rate:.2f} video-s/s)")


# ---------------------------------------------------------------------------------------------- helpers

def shard_from_env(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(N, i): explicit values, else ``WORLD_SIZE`` / ``RANK`` (torchrun), else (1, 0)."""
    n = int(num_shards if num_shards is not None else os.environ.get("WORLD_SIZE", 1))
    i = int(shard_index if shard_index is not None else os.environ.get("RANK", 0))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard_index must be in [0, num_shards), got {i} of {n}")
    return n, i


def shard_dir(out_dir: str | Path, shard_index: int, num_shards: int) -> Path:
    return Path(out_dir) / f"shard-{shard_index}-of-{num_shards}"


def _group_key(item: VideoItem) -> str:
    return item.path if item.path is not None else f"missing:{item.row}"


def _groups(items: list[VideoItem]) -> list[list[VideoItem]]:
    groups: dict[str, list[VideoItem]] = {}
    for it in items:
        groups.setdefault(_group_key(it), []).append(it)
    return list(groups.values())


def _part_path(parts: Path, row: int) -> Path:
    return parts / f"{row:06d}.npz"


def _write_npz(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _meta_array(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def _read_part(path: Path, arrays: bool = True) -> tuple[dict, np.ndarray | None, np.ndarray | None] | None:
    """(meta, audio, visual) of a finished part, or None when missing or unreadable (then redone).
    ``arrays`` False reads only the small ``meta`` member (npz members load lazily)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            if meta.get("status") == "ok" and arrays:
                return meta, z["audio"], z["visual"]
            return meta, None, None
    except Exception as e:  # noqa: BLE001 - a damaged part is simply redone
        log.warning("%s: unreadable part, redoing it (%s)", path, e)
        return None


def _part_done(path: Path) -> dict | None:
    got = _read_part(path, arrays=False)
    return got[0] if got else None


def _store_spec(audio_backbone, visual_backbone, fps: int) -> FeatureSpec:
    a: StreamSpec = audio_backbone.spec
    v: StreamSpec = visual_backbone.spec
    return FeatureSpec(dataclasses.replace(a, fps=1.0),
                       dataclasses.replace(v, fps=1.0, frames_per_segment=int(fps)))


def _run_identity(spec: FeatureSpec, items: list[VideoItem], seconds: int, fps: int,
                  num_shards: int, shard_index: int) -> dict:
    rows = hashlib.sha256(json.dumps([[it.row, it.video_id] for it in items]).encode()).hexdigest()[:16]
    return {"spec": spec.to_dict(), "seconds": int(seconds), "fps": int(fps), "rows": len(items),
            "rows_sha": rows, "num_shards": num_shards, "shard_index": shard_index}


def _same_run(recorded: dict | None, identity: dict) -> bool:
    """Whether a finished store was made by this run (a merged store matches its unsharded run)."""
    if not recorded:
        return False
    skip = ("num_shards", "shard_index", "merged_from")
    if "merged_from" in recorded and identity["num_shards"] == 1:
        return {k: v for k, v in recorded.items() if k not in skip} == \
            {k: v for k, v in identity.items() if k not in skip}
    return recorded == identity


def _atomic_json(path: Path, obj) -> None:
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: str | Path) -> list[dict]:
    """The manifest of a finished store (one dict per row)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (extraction not finished?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- extract

def extract(videos: Sequence[VideoItem | str | Path], out_dir: str | Path, *, audio_backbone, visual_backbone,
            seconds: int = 10, fps: int = 16, batch_frames: int = 64, workers: int = 2,
            num_shards: int | None = 1, shard_index: int | None = 0, progress: bool = True,
            annotations: str | Path | None = None, frame_size="auto", keep_parts: bool = False,
            retry_failed: bool = False, chunk_seconds: int | None = DEFAULT_CHUNK_SECONDS) -> ExtractResult:
    """Extract features of ``videos`` (rows, in order) into the store ``out_dir`` (see the module doc).

    ``audio_backbone`` / ``visual_backbone``: backbone objects (see avel.features.backbones).
    ``workers``: decoding threads running ahead of the CNN (0: decode in the calling thread).
    ``annotations``: the Annotations.txt the rows come from, copied into the store.
    ``frame_size``: see :func:`extract_video`. ``retry_failed``: redo rows that failed in an earlier run.
    ``chunk_seconds``: each video streams through the CNN that many seconds of frames at a time (see
    :func:`extract_video`; a decoding thread holds about two chunks), so memory does not grow with ``seconds``.
    Returns an :class:`ExtractResult`; the store is finalized once all rows of the shard are done.
    """
    t_start = time.perf_counter()
    items = _as_items(videos)
    if not items:
        raise ValueError("no videos to extract")
    seconds, fps = int(seconds), int(fps)
    if seconds < 1 or fps < 1:
        raise ValueError(f"seconds and fps must be >= 1, got {seconds}, {fps}")
    if chunk_seconds is not None and int(chunk_seconds) < 1:
        raise ValueError(f"chunk_seconds must be >= 1 or None, got {chunk_seconds}")
    num_shards, shard_index = shard_from_env(num_shards, shard_index)
    out_dir = Path(out_dir)
    store = shard_dir(out_dir, shard_index, num_shards) if num_shards > 1 else out_dir
    spec = _store_spec(audio_backbone, visual_backbone, fps)
    identity = _run_identity(spec, items, seconds, fps, num_shards, shard_index)

    groups = _groups(items)[shard_index::num_shards]
    rows = sorted((it for g in groups for it in g), key=lambda it: it.row)
    if annotations is not None:
        annotations = Path(annotations)

    # A finished store of this same run: nothing to do.
    if (store / MANIFEST).is_file() and (store / SPEC_FILE).is_file():
        info = json.loads((store / SPEC_FILE).read_text())
        if not _same_run(info.get("extract"), identity):
            raise DataError(f"{store}: already holds features of another extraction "
                            f"(other backbones, length, fps or video list); use another output folder")
        manifest = read_manifest(store)
        log.info("%s: already complete (%d rows)", store, len(manifest))
        return ExtractResult(store, len(rows), len(groups), 0, len(groups),
                             sum(m["status"] == "failed" for m in manifest), sum(bool(m["flags"]) for m in manifest),
                             0.0, time.perf_counter() - t_start, True, num_shards, shard_index)

    parts = store / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    run_path = parts / RUN_FILE
    if run_path.is_file():
        previous = json.loads(run_path.read_text())
        if previous != identity:
            raise DataError(f"{parts}: unfinished parts of another extraction (other backbones, length, fps or "
                            f"video list); remove {parts} or use another output folder")
    else:
        _atomic_json(run_path, identity)
    for stale in parts.glob(".*.tmp"):
        stale.unlink(missing_ok=True)

    # What is left to do.
    todo: list[list[VideoItem]] = []
    resumed = 0
    for g in groups:
        metas = [_part_done(_part_path(parts, it.row)) for it in g]
        if all(m is not None and (m["status"] == "ok" or not retry_failed) for m in metas):
            resumed += 1
        else:
            todo.append(g)
    if resumed:
        log.info("%s: resuming, %d of %d videos already done", store, resumed, len(groups))

    size = _frame_size(visual_backbone, frame_size)
    sample_rate = _sample_rate(audio_backbone)

    def open_stream(item: VideoItem) -> VideoStream:
        if item.path is None:
            raise VideoDecodeError(item.video_id, "video file not found")
        return VideoStream(item.path, fps=fps, seconds=seconds, sample_rate=sample_rate, size=size)

    processed = failed_now = 0
    video_seconds = 0.0
    bar = _progress_bar(len(groups), resumed, progress, store)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="avel-decode") if workers > 0 else None
    pending: deque[tuple[list[VideoItem], _Prefetch]] = deque()
    queue_ = iter(todo)
    ahead = max(1, workers) + 1
    current: _Prefetch | None = None

    def fill():
        while len(pending) < ahead:
            g = next(queue_, None)
            if g is None:
                return
            pre = _Prefetch(lambda item=g[0]: open_stream(item), chunk_seconds, threaded=pool is not None)
            if pool is not None:
                pool.submit(pre.run)
            pending.append((g, pre))

    try:
        fill()
        while pending:
            g, current = pending.popleft()
            fill()
            error = None
            try:
                feats = _stream_features(current.chunks(), current, audio_backbone=audio_backbone,
                                         visual_backbone=visual_backbone, fps=fps, batch_frames=batch_frames)
            except _DecodeFailure as failure:
                e = failure.error
                if isinstance(e, VideoDecodeError):
                    error = str(e)
                else:   # any decoding trouble is this video's failure, not the run's
                    log.warning("%s: decoding failed", g[0].path, exc_info=e)
                    error = f"{g[0].path}: {type(e).__name__}: {e}"
            current = None
            if error is None:
                for it in g:
                    meta = {"video_id": it.video_id, "path": it.path, "status": "ok", "flags": feats.flags,
                            "seconds": seconds, "duration": round(feats.duration, 4), "error": None}
                    _write_npz(_part_path(parts, it.row), audio=feats.audio, visual=feats.visual,
                               meta=_meta_array(meta))
                del feats
                video_seconds += seconds
            else:
                log.warning("failed: %s", error)
                failed_now += len(g)
                for it in g:
                    meta = {"video_id": it.video_id, "path": it.path, "status": "failed", "flags": {"failed": True},
                            "seconds": seconds, "duration": None, "error": error}
                    _write_npz(_part_path(parts, it.row), meta=_meta_array(meta))
            processed += 1
            if bar is not None:
                bar.update(1)
                if failed_now:
                    bar.set_postfix(failed=failed_now, refresh=False)
    finally:
        for pre in [current, *(pre for _, pre in pending)]:
            if pre is not None:
                pre.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()

    manifest = _finalize(store, rows, parts, spec, identity, seconds, len(groups), annotations,
                         shard=(shard_index, num_shards))
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    result = ExtractResult(store, len(rows), len(groups), processed, resumed,
                           sum(m["status"] == "failed" for m in manifest), sum(bool(m["flags"]) for m in manifest),
                           video_seconds, time.perf_counter() - t_start, True, num_shards, shard_index)
    log.info("%s", result.summary())
    if num_shards > 1:
        log.info("shard %d of %d done; once every shard is, join them with `avel extract merge %s`",
                 shard_index, num_shards, out_dir)
    return result


def _progress_bar(total: int, initial: int, progress: bool, store: Path):
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="video", desc=f"extract {store.name}", dynamic_ncols=True)


def _shapes(spec: FeatureSpec, seconds: int, first_ok) -> tuple[tuple, tuple]:
    if first_ok is not None:
        return tuple(first_ok[1].shape), tuple(first_ok[2].shape)
    grid = tuple(spec.visual.grid)
    return (seconds, spec.audio.dim), (seconds, *grid, spec.visual.dim)


class _H5Writer:
    """The three feature files of a store, written under temporary names and renamed together."""

    def __init__(self, folder: Path, n: int, audio_shape: tuple, visual_shape: tuple):
        self.folder = folder
        self.names = (AUDIO_FILE, VISUAL_FILE, VISUAL_VEC_FILE)
        self.tmp = [folder / f".{name}.tmp" for name in self.names]
        vec_shape = (visual_shape[0], visual_shape[-1])
        self.files = [h5py.File(t, "w") for t in self.tmp]
        self.ds = [f.create_dataset(H5_KEY, shape=(n, *shape), dtype=np.float32, chunks=(1, *shape))
                   for f, shape in zip(self.files, (audio_shape, visual_shape, vec_shape))]

    def write(self, i: int, audio: np.ndarray, visual: np.ndarray) -> None:
        self.ds[0][i] = audio
        self.ds[1][i] = visual
        self.ds[2][i] = visual.reshape(visual.shape[0], -1, visual.shape[-1]).mean(1) if visual.ndim > 2 else visual

    def commit(self) -> None:
        for f in self.files:
            f.close()
        for tmp, name in zip(self.tmp, self.names):
            os.replace(tmp, self.folder / name)

    def abort(self) -> None:
        for f, tmp in zip(self.files, self.tmp):
            try:
                f.close()
            finally:
                tmp.unlink(missing_ok=True)


def _finalize(store: Path, rows: list[VideoItem], parts: Path, spec: FeatureSpec, identity: dict, seconds: int,
              videos: int, annotations: Path | None, *, shard: tuple[int, int]) -> list[dict]:
    shard_index, num_shards = shard
    first_ok = None
    for it in rows:
        meta = _part_done(_part_path(parts, it.row))
        if meta is None:
            raise DataError(f"{parts}: row {it.row} ({it.video_id}) has no finished part")
        if first_ok is None and meta["status"] == "ok":
            first_ok = _read_part(_part_path(parts, it.row))
    audio_shape, visual_shape = _shapes(spec, seconds, first_ok)
    writer = _H5Writer(store, len(rows), audio_shape, visual_shape)
    manifest = []
    try:
        for i, it in enumerate(rows):
            meta, audio, visual = _read_part(_part_path(parts, it.row))
            if meta["status"] == "ok":
                if audio.shape != audio_shape or visual.shape != visual_shape:
                    raise DataError(f"{parts}: row {it.row}: feature shapes {audio.shape}/{visual.shape} differ "
                                    f"from the other rows' {audio_shape}/{visual_shape}")
                writer.write(i, audio, visual)
            else:
                writer.write(i, np.zeros(audio_shape, np.float32), np.zeros(visual_shape, np.float32))
            entry = {"row": i, "video_id": meta["video_id"], "path": meta["path"], "status": meta["status"],
                     "flags": meta["flags"], "seconds": meta["seconds"], "duration": meta["duration"],
                     "error": meta["error"]}
            if num_shards > 1:
                entry["source_row"] = it.row
            manifest.append(entry)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    if annotations is not None and num_shards == 1:
        _atomic_copy(annotations, store / ANNOTATIONS)
    elif all(it.annotation is not None for it in rows):
        from ..engine.checkpoint import atomic_write_text

        atomic_write_text(store / ANNOTATIONS, "".join(it.annotation + "\n" for it in rows))
    failed = sum(m["status"] == "failed" for m in manifest)
    write_spec(store, spec, rows=len(rows), videos=videos, seconds=seconds, fps=identity["fps"], failed=failed,
               flagged=sum(bool(m["flags"]) for m in manifest),
               source=str(annotations) if annotations is not None else None, extract=identity)
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(store / MANIFEST, "".join(json.dumps(m) + "\n" for m in manifest))
    return manifest


# ---------------------------------------------------------------------------------------------- merge

def merge_shards(out_dir: str | Path) -> ExtractResult:
    """Join the finished ``<out>/shard-<i>-of-<N>/`` stores into ``<out>/``, rows in the original order."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    found: dict[int, dict[int, Path]] = {}
    for p in out_dir.iterdir() if out_dir.is_dir() else []:
        m = _SHARD_RE.match(p.name)
        if m and p.is_dir():
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise DataError(f"{out_dir}: no shard-<i>-of-<N> folders to merge")
    if len(found) > 1:
        raise DataError(f"{out_dir}: shard folders of several shard counts {sorted(found)}; remove the stale ones")
    (n, shards), = found.items()
    missing = [i for i in range(n) if i not in shards]
    unfinished = [str(p) for p in shards.values() if not (p / MANIFEST).is_file()]
    if missing or unfinished:
        raise DataError(f"{out_dir}: cannot merge yet: missing shards {missing}, unfinished {unfinished}")
    infos = [json.loads((shards[i] / SPEC_FILE).read_text()) for i in range(n)]
    manifests = [read_manifest(shards[i]) for i in range(n)]
    spec_dicts = {json.dumps(info["spec"], sort_keys=True) for info in infos}
    if len(spec_dicts) > 1:
        raise DataError(f"{out_dir}: the shards were extracted with different feature specs")
    total = infos[0]["extract"]["rows"]
    where: dict[int, tuple[int, int]] = {}
    for i, man in enumerate(manifests):
        for m in man:
            src = m.get("source_row", m["row"])
            if src in where:
                raise DataError(f"{out_dir}: row {src} appears in two shards")
            where[src] = (i, m["row"])
    if sorted(where) != list(range(total)):
        raise DataError(f"{out_dir}: the shards hold {len(where)} of {total} rows")
    spec = FeatureSpec.from_dict(infos[0]["spec"])
    readers = [[h5py.File(shards[i] / name, "r") for name in (AUDIO_FILE, VISUAL_FILE)] for i in range(n)]
    try:
        audio_shape = readers[0][0][H5_KEY].shape[1:]
        visual_shape = readers[0][1][H5_KEY].shape[1:]
        writer = _H5Writer(out_dir, total, audio_shape, visual_shape)
        try:
            manifest = []
            for r in range(total):
                i, local = where[r]
                writer.write(r, readers[i][0][H5_KEY][local], readers[i][1][H5_KEY][local])
                entry = dict(manifests[i][local])
                entry["row"] = r
                entry.pop("source_row", None)
                manifest.append(entry)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    finally:
        for pair in readers:
            for f in pair:
                f.close()
    source = infos[0].get("source")
    if source and Path(source).is_file():
        _atomic_copy(Path(source), out_dir / ANNOTATIONS)
    elif all((shards[i] / ANNOTATIONS).is_file() for i in range(n)):
        lines = [(shards[i] / ANNOTATIONS).read_text().splitlines() for i in range(n)]
        from ..engine.checkpoint import atomic_write_text

        atomic_write_text(out_dir / ANNOTATIONS, "".join(lines[where[r][0]][where[r][1]] + "\n" for r in range(total)))
    identity = dict(infos[0]["extract"], num_shards=1, shard_index=0, merged_from=n)
    videos = sum(info.get("videos", 0) for info in infos)
    failed = sum(m["status"] == "failed" for m in manifest)
    flagged = sum(bool(m["flags"]) for m in manifest)
    write_spec(out_dir, spec, rows=total, videos=videos, seconds=infos[0]["seconds"], fps=infos[0]["fps"],
               failed=failed, flagged=flagged, source=source, extract=identity)
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(out_dir / MANIFEST, "".join(json.dumps(m) + "\n" for m in manifest))
    result = ExtractResult(out_dir, total, videos, 0, 0, failed, flagged, 0.0, time.perf_counter() - t0, True,
                           merged_from=n)
    log.info("%s", result.summary())
    return result


# ---------------------------------------------------------------------------------------------- CLI entry points

def run_extract(inputs: Sequence[str], out: str, *, video_dir: str | None = None, audio: str = "logmel",
                visual: str = "efficientnet-lite0", audio_weights: str | None = None,
                visual_weights: str | None = None, seconds: int = 10, fps: int = 16, batch_frames: int = 64,
                workers: int = 2, num_shards: int | None = None, shard_index: int | None = None,
                device: str = "cpu", progress: bool = True, keep_parts: bool = False,
                retry_failed: bool = False, visual_size: int | None = None) -> ExtractResult:
    """``avel extract``: build the backbones by name and extract ``inputs`` into ``out``.

    ``visual_size``: input size of a backbone that takes any (efficientnet-lite0: 224 gives its
    7x7 grid, 128 a 4x4 grid at a third of the cost); recorded in the store's feature spec."""
    from .backbones import build_audio_backbone, build_visual_backbone

    items, annotations = collect_videos(inputs, video_dir=video_dir)
    num_shards, shard_index = shard_from_env(num_shards, shard_index)
    audio_bb = build_audio_backbone(audio, weights=audio_weights, device=device)
    sized = {"image_size": visual_size} if visual_size else {}
    visual_bb = build_visual_backbone(visual, weights=visual_weights, device=device, **sized)
    return extract(items, out, audio_backbone=audio_bb, visual_backbone=visual_bb, seconds=seconds, fps=fps,
                   batch_frames=batch_frames, workers=workers, num_shards=num_shards, shard_index=shard_index,
                   progress=progress, annotations=annotations, keep_parts=keep_parts, retry_failed=retry_failed)


def run_merge(out: str) -> ExtractResult:
    """``avel extract merge OUT``."""
    return merge_shards(out)
