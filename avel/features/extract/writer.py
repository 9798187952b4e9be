"""The store an extraction leaves: per-video parts while it runs, then the h5 files, features.json and
manifest.jsonl; and the merge of finished shards into one store.

``<store>/parts/<row:06d>.npz`` holds each finished row (arrays ``audio``, ``visual`` and ``meta``, the
manifest entry as UTF-8 JSON bytes; written atomically, read with ``allow_pickle=False``). The store's
feature files are written by :func:`avel.layout.write_rows` (one h5 writer for every avel-made folder);
``manifest.jsonl`` is written last, so its presence means the store is complete.

A write that fails (a full disk) raises ``OSError`` naming the file or the store; :func:`finalize` then
removes what it had written, so a store is either complete (with its manifest) or holds no feature
files of this run, and the parts stay for the rerun.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ...data.errors import DataError
from ...data.store import write_spec
from ...io import FolderLock, atomic_output, atomic_write, remove_stale_temporaries
from ...layout import (
    ANNOTATIONS,
    AUDIO_FEATURES,
    FEATURE_FILES,
    H5_KEY,
    MANIFEST,
    SPEC_FILE,
    VISUAL_FEATURES,
    write_rows,
)
from ...spec import FeatureSpec
from .inputs import VideoItem

log = logging.getLogger(__name__)

PARTS = "parts"
_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


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


def shard_dir(out_dir: str | Path, shard_index: int, num_shards: int) -> Path:
    return Path(out_dir) / f"shard-{shard_index}-of-{num_shards}"


def part_path(parts: Path, row: int) -> Path:
    return parts / f"{row:06d}.npz"


def named_os_error(e: OSError, path: str | Path) -> OSError:
    """``e`` as one line naming ``path`` (the file being written, or the store): ``[Errno 28] No space left on
    device: 'PATH'`` (HDF5's multi-line reports are replaced by the errno's text)."""
    code = e.errno if e.errno else errno.EIO
    text = os.strerror(e.errno) if e.errno else " ".join(str(e.strerror or e).split())[:300]
    return OSError(code, text, str(path))


def check_space(store: Path, n: int, audio_shape: tuple, visual_shape: tuple) -> None:
    """Refuse to start the h5 files on a disk that cannot hold them (``OSError`` ENOSPC naming the store).

    Not only for a clearer message: h5py/HDF5 (3.16 / 2.0) crash the process (a segmentation fault) when
    the objects of a file whose flush failed for a full disk are freed, so a full disk must be found before
    HDF5 writes, not by it."""
    values = n * (int(np.prod(audio_shape)) + int(np.prod(visual_shape)) + visual_shape[0] * visual_shape[-1])
    need = int(4 * values * 1.02) + 3 * 4096 * max(1, n) + (1 << 20)     # float32 data, chunk index, metadata
    try:
        free = shutil.disk_usage(store).free
    except OSError:
        return
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device: the feature files need about {need / 2**20:.1f} MB, "
                      f"{free / 2**20:.1f} MB are free", str(store))


def write_part(path: Path, **arrays) -> None:
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise named_os_error(e, path) from None


def meta_array(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def read_part(path: Path, arrays: bool = True) -> tuple[dict, np.ndarray | None, np.ndarray | None] | None:
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


def part_done(path: Path) -> dict | None:
    got = read_part(path, arrays=False)
    return got[0] if got else None


def read_manifest(folder: str | Path) -> list[dict]:
    """The manifest of a finished store (one dict per row)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (extraction not finished?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def atomic_copy(src: Path, dst: Path) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------------------------- the store

def _shapes(spec: FeatureSpec, seconds: int, first_ok) -> tuple[tuple, tuple]:
    if first_ok is not None:
        return tuple(first_ok[1].shape), tuple(first_ok[2].shape)
    grid = tuple(spec.visual.grid)
    return (seconds, spec.audio.dim), (seconds, *grid, spec.visual.dim)


def finalize(store: Path, rows: list[VideoItem], parts: Path, spec: FeatureSpec, identity: dict, seconds: int,
              videos: int, annotations: Path | None, *, shard: tuple[int, int]) -> list[dict]:
    shard_index, num_shards = shard
    first_ok = None
    for it in rows:
        meta = part_done(part_path(parts, it.row))
        if meta is None:
            raise DataError(f"{parts}: row {it.row} ({it.video_id}) has no finished part")
        if first_ok is None and meta["status"] == "ok":
            first_ok = read_part(part_path(parts, it.row))
    audio_shape, visual_shape = _shapes(spec, seconds, first_ok)
    manifest: list[dict] = []

    def filled():
        for i, it in enumerate(rows):
            meta, audio, visual = read_part(part_path(parts, it.row))
            if meta["status"] == "ok":
                if audio.shape != audio_shape or visual.shape != visual_shape:
                    raise DataError(f"{parts}: row {it.row}: feature shapes {audio.shape}/{visual.shape} differ "
                                    f"from the other rows' {audio_shape}/{visual_shape}")
                yield i, audio, visual
            else:
                yield i, np.zeros(audio_shape, np.float32), np.zeros(visual_shape, np.float32)
            entry = {"row": i, "video_id": meta["video_id"], "path": meta["path"], "status": meta["status"],
                     "flags": meta["flags"], "seconds": meta["seconds"], "duration": meta["duration"],
                     "error": meta["error"]}
            if num_shards > 1:
                entry["source_row"] = it.row
            manifest.append(entry)

    written: list[Path] = []      # removed again if the finish fails: no store that looks done but is not
    try:
        check_space(store, len(rows), audio_shape, visual_shape)
        write_rows(store, len(rows), audio_shape, visual_shape, filled())
        written += [store / name for name in FEATURE_FILES]
        if annotations is not None and num_shards == 1:
            atomic_copy(annotations, store / ANNOTATIONS)
            written.append(store / ANNOTATIONS)
        elif all(it.annotation is not None for it in rows):
            atomic_write(store / ANNOTATIONS, "".join(it.annotation + "\n" for it in rows))
            written.append(store / ANNOTATIONS)
        failed = sum(m["status"] == "failed" for m in manifest)
        write_spec(store, spec, rows=len(rows), videos=videos, seconds=seconds, fps=identity["fps"], failed=failed,
                   flagged=sum(bool(m["flags"]) for m in manifest),
                   source=str(annotations) if annotations is not None else None, extract=identity)
        written.append(store / SPEC_FILE)
        atomic_write(store / MANIFEST, "".join(json.dumps(m) + "\n" for m in manifest))
    except BaseException as e:
        for p in written:
            p.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename != str(store):
            raise named_os_error(e, store) from None
        raise
    return manifest


# ---------------------------------------------------------------------------------------------- merge

def merge_shards(out_dir: str | Path) -> ExtractResult:
    """Join the finished ``<out>/shard-<i>-of-<N>/`` stores into ``<out>/``, rows in the original order
    (holding ``<out>``'s folder lock, as an extraction into it would)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: no shard-<i>-of-<N> folders to merge (not a folder)")
    with FolderLock(out_dir):
        remove_stale_temporaries(out_dir)
        return _merge_shards(out_dir)


def _merge_shards(out_dir: Path) -> ExtractResult:
    t0 = time.perf_counter()
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
    readers = [[h5py.File(shards[i] / name, "r") for name in (AUDIO_FEATURES, VISUAL_FEATURES)] for i in range(n)]
    manifest = []

    def joined():
        for r in range(total):
            i, local = where[r]
            yield r, readers[i][0][H5_KEY][local], readers[i][1][H5_KEY][local]
            entry = dict(manifests[i][local])
            entry["row"] = r
            entry.pop("source_row", None)
            manifest.append(entry)

    try:
        write_rows(out_dir, total, readers[0][0][H5_KEY].shape[1:], readers[0][1][H5_KEY].shape[1:], joined())
    finally:
        for pair in readers:
            for f in pair:
                f.close()
    source = infos[0].get("source")
    if source and Path(source).is_file():
        atomic_copy(Path(source), out_dir / ANNOTATIONS)
    elif all((shards[i] / ANNOTATIONS).is_file() for i in range(n)):
        lines = [(shards[i] / ANNOTATIONS).read_text().splitlines() for i in range(n)]
        atomic_write(out_dir / ANNOTATIONS, "".join(lines[where[r][0]][where[r][1]] + "\n" for r in range(total)))
    identity = dict(infos[0]["extract"], num_shards=1, shard_index=0, merged_from=n)
    videos = sum(info.get("videos", 0) for info in infos)
    failed = sum(m["status"] == "failed" for m in manifest)
    flagged = sum(bool(m["flags"]) for m in manifest)
    write_spec(out_dir, spec, rows=total, videos=videos, seconds=infos[0]["seconds"], fps=infos[0]["fps"],
               failed=failed, flagged=flagged, source=source, extract=identity)
    atomic_write(out_dir / MANIFEST, "".join(json.dumps(m) + "\n" for m in manifest))
    result = ExtractResult(out_dir, total, videos, 0, 0, failed, flagged, 0.0, time.perf_counter() - t0, True,
                           merged_from=n)
    log.info("%s", result.summary())
    return result
