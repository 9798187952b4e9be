"""The resumable extraction job: a video list -> a feature store, decoding threads ahead of the CNN.

Layout of an output folder
--------------------------
``audio_feature.h5`` [N, T, Da], ``visual_feature.h5`` [N, T, gh, gw, Dv], ``visual_feature_vec.h5``
[N, T, Dv] (grid average), each with dataset ``avadataset`` (float32); ``features.json`` (feature spec,
rows, videos, failures); ``manifest.jsonl`` (one JSON object per row: row, video_id, path, status
'ok'|'failed', flags, seconds, duration, error); a copy of ``Annotations.txt`` when the input was one:
the folder is a complete avel data root. ``manifest.jsonl`` is written last: its presence means done.

Resume: while running, ``<out>/parts/`` holds each finished row (see :mod:`.writer`) and
``parts/run.json`` the run's identity (backbone specs, T, fps, the rows). A killed run restarted with
the same arguments redoes no finished row and loses none. The parts are removed once the store is
written (``keep_parts=True`` keeps them).

One writer per store: the job holds :class:`avel.io.FolderLock` on the store folder while it runs (a
second extraction into the same folder is refused at once with the holder's pid), and on start, under
the lock, removes the temporaries a killed run left there and in ``parts/``. A write that fails (a
full disk) raises ``OSError`` naming the file: finished parts stay, the store is not left half-written
(what the failed finish wrote is removed; ``manifest.jsonl`` only appears once all is written), and a
rerun picks up where it stopped.

Length policy: every row has ``seconds`` (T) segments. Shorter videos: the visual stream repeats the
last frame, the audio is zero-padded (silence) -- flags ``padded_video`` / ``padded_audio``; longer
videos are cut at T (``truncated``). A video that cannot be decoded at all is recorded as ``failed``
with a one-line error naming the file, its row is zeros, and the run goes on. Errors of the backbones are not data errors:
they stop the run (resume picks up after the last finished video).

Sharding: ``num_shards`` N and ``shard_index`` i (default: ``WORLD_SIZE`` / ``RANK`` from the
environment, as set by ``torchrun``). Unique videos are dealt round-robin (video j -> shard j mod N;
strided, so long and short stretches of the list spread evenly, and a duplicated id never lands in
two shards). Shard i writes ``<out>/shard-<i>-of-<N>/``, a complete store of its rows (with its own
manifest and Annotations subset); :func:`~.writer.merge_shards` joins them into ``<out>/`` in the
original row order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ...data.errors import DataError
from ...io import FolderLock, atomic_write_json, remove_stale_temporaries
from ...layout import MANIFEST, SPEC_FILE
from ...spec import FeatureSpec, StreamSpec
from ..decode import VideoDecodeError, VideoStream, file_problem
from .inputs import VideoItem, as_items
from .video import DEFAULT_CHUNK_SECONDS, DecodeFailure, Prefetch, frame_size_for, sample_rate_for, stream_features
from .writer import (
    PARTS,
    ExtractResult,
    finalize,
    meta_array,
    part_done,
    part_path,
    read_manifest,
    shard_dir,
    write_part,
)

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ERROR_LIMIT = 400      # characters of a failed row's error message (one line)


def one_line(message: str, limit: int = ERROR_LIMIT) -> str:
    """``message`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shard_from_env(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(N, i): explicit values, else ``WORLD_SIZE`` / ``RANK`` (torchrun), else (1, 0)."""
    n = int(num_shards if num_shards is not None else os.environ.get("WORLD_SIZE", 1))
    i = int(shard_index if shard_index is not None else os.environ.get("RANK", 0))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard_index must be in [0, num_shards), got {i} of {n}")
    return n, i


def _group_key(item: VideoItem) -> str:
    return item.path if item.path is not None else f"missing:{item.row}"


def _groups(items: list[VideoItem]) -> list[list[VideoItem]]:
    groups: dict[str, list[VideoItem]] = {}
    for it in items:
        groups.setdefault(_group_key(it), []).append(it)
    return list(groups.values())


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
    items = as_items(videos)
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
    for folder in (out_dir, store):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder}: is a file, not a feature folder (choose another --out)")
    with FolderLock(store):
        remove_stale_temporaries(store)          # what a killed run left (we hold the folder)
        return _extract(items, out_dir, store, audio_backbone=audio_backbone, visual_backbone=visual_backbone,
                        seconds=seconds, fps=fps, batch_frames=batch_frames, workers=workers, num_shards=num_shards,
                        shard_index=shard_index, progress=progress, annotations=annotations,
                        frame_size=frame_size, keep_parts=keep_parts, retry_failed=retry_failed,
                        chunk_seconds=chunk_seconds, t_start=t_start)


def _extract(items: list[VideoItem], out_dir: Path, store: Path, *, audio_backbone, visual_backbone, seconds: int,
             fps: int, batch_frames: int, workers: int, num_shards: int, shard_index: int, progress: bool,
             annotations, frame_size, keep_parts: bool, retry_failed: bool, chunk_seconds: int | None,
             t_start: float) -> ExtractResult:
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
        atomic_write_json(run_path, identity)
    remove_stale_temporaries(parts)

    # What is left to do.
    todo: list[list[VideoItem]] = []
    resumed = 0
    for g in groups:
        metas = [part_done(part_path(parts, it.row)) for it in g]
        if all(m is not None and (m["status"] == "ok" or not retry_failed) for m in metas):
            resumed += 1
        else:
            todo.append(g)
    if resumed:
        log.info("%s: resuming, %d of %d videos already done", store, resumed, len(groups))

    size = frame_size_for(visual_backbone, frame_size)
    sample_rate = sample_rate_for(audio_backbone)

    def open_stream(item: VideoItem) -> VideoStream:
        if item.path is None:
            raise VideoDecodeError(item.video_id, "video file not found")
        problem = file_problem(item.path)        # a folder, a broken link, a fifo: fail the row, never hang
        if problem is not None:
            raise VideoDecodeError(item.path, problem)
        return VideoStream(item.path, fps=fps, seconds=seconds, sample_rate=sample_rate, size=size)

    processed = failed_now = 0
    video_seconds = 0.0
    bar = _progress_bar(len(groups), resumed, progress, store)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="avel-decode") if workers > 0 else None
    pending: deque[tuple[list[VideoItem], Prefetch]] = deque()
    queue_ = iter(todo)
    ahead = max(1, workers) + 1
    current: Prefetch | None = None

    def fill():
        while len(pending) < ahead:
            g = next(queue_, None)
            if g is None:
                return
            pre = Prefetch(lambda item=g[0]: open_stream(item), chunk_seconds, threaded=pool is not None)
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
                feats = stream_features(current.chunks(), current, audio_backbone=audio_backbone,
                                         visual_backbone=visual_backbone, fps=fps, batch_frames=batch_frames)
            except DecodeFailure as failure:
                e = failure.error
                if isinstance(e, VideoDecodeError):
                    error = one_line(e)
                else:   # any decoding trouble is this video's failure, not the run's
                    log.warning("%s: decoding failed", g[0].path, exc_info=e)
                    error = one_line(f"{g[0].path}: {type(e).__name__}: {e}")
            current = None
            if error is None:
                for it in g:
                    meta = {"video_id": it.video_id, "path": it.path, "status": "ok", "flags": feats.flags,
                            "seconds": seconds, "duration": round(feats.duration, 4), "error": None}
                    write_part(part_path(parts, it.row), audio=feats.audio, visual=feats.visual,
                               meta=meta_array(meta))
                del feats
                video_seconds += seconds
            else:
                log.warning("failed: %s", error)
                failed_now += len(g)
                for it in g:
                    meta = {"video_id": it.video_id, "path": it.path, "status": "failed", "flags": {"failed": True},
                            "seconds": seconds, "duration": None, "error": error}
                    write_part(part_path(parts, it.row), meta=meta_array(meta))
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

    manifest = finalize(store, rows, parts, spec, identity, seconds, len(groups), annotations,
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
    return tqdm(total=total, initial=initial, unit="video", desc=f"extract {store.name}", dynamic_ncols=True)
