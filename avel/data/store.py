"""Feature files: the official h5 layout read lazily, and a packed memory-mapped layout.

Official layout (a folder): ``audio_feature.h5`` [N, T, Da], ``visual_feature.h5`` [N, T, H, W, Dv],
each with the dataset ``avadataset`` (float32 or float64), row i = line i of ``Annotations.txt``.
Nothing here ever loads a whole feature file: rows are read on demand, in sorted order (h5py needs
increasing indices), converted to float32 and put back in the order asked for.

Packed layout (``avel data pack``): ``<root>/packed/{audio,visual}.npy`` (float16 by default,
contiguous) plus ``packed.json`` recording the source, dtype and feature spec. Same rows, same
order. Rows are read with positioned reads (``os.preadv``) straight into the output in the order
asked for, so reading a file does not map it into the process (its pages stay in the shared page
cache instead of counting as resident memory), and float16 is widened by torch's vectorised copy.

Batches are big (64 AVE videos = 64 MB of float32) and a fresh block that size costs its page
faults every time: both readers hand out arrays from a small :class:`ArrayPool`, reusing one only
once nothing references it any more (the training step that used it has dropped it).
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..io import atomic_output, atomic_write
from ..layout import H5_KEY, PACKED_DIR, SPEC_FILE
from ..spec import AVE_OFFICIAL, FeatureSpec, StreamSpec
from .errors import DataError

PACKED_META = "packed.json"


class ArrayPool:
    """Output arrays handed out again once nobody holds them (or a view of them) any more."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, shape: tuple, dtype) -> np.ndarray:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        with self._lock:
            for i in range(len(self._arrays)):
                # (checked before any local name refers to the array: that would count as a holder)
                if _free(self._arrays, i) and self._arrays[i].shape == shape and self._arrays[i].dtype == dtype:
                    return self._arrays[i]
            # A miss: free arrays of other shapes (the last short batch, another split) are dropped,
            # so the pool never holds more than the batches in flight plus this one.
            self._arrays = [self._arrays[i] for i in range(len(self._arrays))
                            if not _free(self._arrays, i)][-(self.keep - 1):]
            self._arrays.append(np.empty(shape, dtype))
            return self._arrays[-1]

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()


def _refs(arrays: list, i: int) -> int:
    return sys.getrefcount(arrays[i])


# References to an array held only by the pool's list, as _refs counts them on this Python.
_ALONE = _refs([np.empty(1)], 0)


def _free(arrays: list, i: int) -> bool:
    return _refs(arrays, i) == _ALONE


class _ProcessLocal:
    """Readers travel to other processes (DDP, spawn) without their open handle or buffer pool:
    the handle reopens on first use there, the pool starts empty."""

    _handle = "_file"

    def __getstate__(self):
        state = dict(self.__dict__)
        state[self._handle] = None
        state["_pool"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool = ArrayPool()


class H5Rows(_ProcessLocal):
    """Lazy row access to one dataset of an h5 file. Opens the file on first use in each process."""

    def __init__(self, path: str | Path, key: str = H5_KEY):
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        try:
            with h5py.File(self.path, "r") as f:
                if key not in f:
                    names = ", ".join(list(f.keys())[:10]) or "nothing"
                    raise DataError(f"{self.path}: no dataset {key!r} (has: {names[:200]})")
                ds = f[key]
                if not isinstance(ds, h5py.Dataset):
                    raise DataError(f"{self.path}: {key!r} is a {type(ds).__name__.lower()}, not a dataset")
                self.shape = tuple(ds.shape)
                self.dtype = ds.dtype
        except OSError as e:
            raise DataError(f"{self.path}: not a readable HDF5 file ({e})") from None
        _check_array(self.path, key, self.shape, self.dtype)
        self._file = None
        self._pid = None
        self._pool = ArrayPool()

    def __len__(self) -> int:
        return self.shape[0]

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.key]

    def read(self, indices) -> np.ndarray:
        """Rows ``indices`` (any order, repeats allowed) as float32."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise DataError(f"{self.path}: row index out of range [0, {self.shape[0]}): {idx.min()}..{idx.max()}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        ds = self._dataset()
        in_order = len(uniq) == len(idx) and bool((np.diff(idx) > 0).all())   # sorted, no repeats: no reordering
        out = self._pool.get((len(uniq), *self.shape[1:]), np.float32) if in_order else \
            np.empty((len(uniq), *self.shape[1:]), dtype=np.float32)
        # Contiguous runs are read as one hyperslab each: cheap for sorted/sequential access.
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        pos = 0
        for run in np.split(uniq, breaks) if len(uniq) else []:
            out[pos:pos + len(run)] = ds[run[0]:run[-1] + 1]
            pos += len(run)
        if in_order:
            return out
        return np.take(out, inverse.reshape(-1), axis=0, out=self._pool.get((len(idx), *self.shape[1:]), np.float32))

    def blocks(self, rows: int):
        """The stored rows in their own dtype, ``rows`` at a time (for scans that never hold the whole file)."""
        ds = self._dataset()
        for lo in range(0, self.shape[0], rows):
            yield ds[lo:lo + rows]

    def read_all(self) -> np.ndarray:
        """For small files only (labels, orders)."""
        return np.asarray(self._dataset()[()])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class NpyRows(_ProcessLocal):
    """Row access to a .npy array (the packed layout); returns float32 rows in the order asked for."""

    _handle = "_fd"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        array = np.load(self.path, mmap_mode="r")
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self._offset = int(array.offset) if array.flags.c_contiguous and array.dtype.isnative else None
        del array
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = None
        self._pid = None
        self._pool = ArrayPool()

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise DataError(f"{self.path}: row index out of range [0, {self.shape[0]}): {idx.min()}..{idx.max()}")
        if self._offset is None or not hasattr(os, "preadv"):
            return np.load(self.path, mmap_mode="r")[idx].astype(np.float32)
        out = self._pool.get((len(idx), *self.shape[1:]), np.float32)
        raw = out if self.dtype == np.float32 else self._pool.get((len(idx), *self.shape[1:]), self.dtype)
        fd = self._file()
        # Runs of consecutive rows (in the order asked for) are one read each.
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate([[0], breaks]) if len(idx) else []
        ends = np.concatenate([breaks, [len(idx)]]) if len(idx) else []
        for a, b in zip(starts, ends):
            view = memoryview(raw[a:b]).cast("B")
            offset, done = self._offset + int(idx[a]) * self._row_bytes, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise DataError(f"{self.path}: file ends before row {int(idx[a])} (truncated?)")
                done += got
        if raw is not out:
            _widen(raw, out)
        return out

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = os.getpid()
        return self._fd

    def read_all(self) -> np.ndarray:
        return np.asarray(np.load(self.path, mmap_mode="r"), dtype=np.float32)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass



def _widen(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[...] = src as float32; torch's vectorised conversion is several times numpy's for float16."""
    try:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    except (TypeError, RuntimeError):
        dst[...] = src


@dataclass
class FeatureStore:
    """Audio and visual rows of one feature folder, with the spec that made them."""

    root: Path
    audio: H5Rows | NpyRows
    visual: H5Rows | NpyRows
    spec: FeatureSpec
    layout: str                     # 'h5' or 'packed'

    def __len__(self) -> int:
        return len(self.audio)

    @property
    def segments(self) -> int:
        return self.audio.shape[1]

    def read(self, indices) -> dict[str, np.ndarray]:
        return {"audio": self.audio.read(indices), "visual": self.visual.read(indices)}


def read_spec(root: Path) -> FeatureSpec:
    """The spec recorded in ``features.json``; the official release has none and is AVE_OFFICIAL."""
    path = Path(root) / SPEC_FILE
    if not path.is_file():
        return AVE_OFFICIAL
    try:
        return FeatureSpec.from_dict(json.loads(path.read_text())["spec"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed feature spec ({e})") from None


def write_spec(root: Path, spec: FeatureSpec, **extra) -> None:
    atomic_write(Path(root) / SPEC_FILE, json.dumps({"spec": spec.to_dict(), **extra}, indent=2))


def open_store(root: str | Path, *, layout: str = "auto", audio_file: str = "audio_feature.h5",
               visual_file: str = "visual_feature.h5") -> FeatureStore:
    """Open a feature folder. ``layout``: 'auto' (packed when present), 'h5' or 'packed'."""
    root = Path(root)
    packed = root / PACKED_DIR
    if layout not in {"auto", "h5", "packed"}:
        raise ValueError(f"layout must be auto, h5 or packed, not {layout!r}")
    use_packed = layout == "packed" or (layout == "auto" and (packed / PACKED_META).is_file()
                                        and audio_file == "audio_feature.h5")
    if use_packed:
        if not (packed / PACKED_META).is_file():
            raise DataError(f"{packed}: no packed layout here (run `avel data pack {root}`)")
        meta = json.loads((packed / PACKED_META).read_text())
        audio, visual = NpyRows(packed / "audio.npy"), NpyRows(packed / "visual.npy")
        spec = FeatureSpec.from_dict(meta["spec"])
    else:
        audio, visual = H5Rows(root / audio_file), H5Rows(root / visual_file)
        spec = read_spec(root)
    if len(audio.shape) != 3:
        raise DataError(f"{audio.path}: expected [N, T, D], got shape {audio.shape}")
    if len(visual.shape) not in (3, 5):
        raise DataError(f"{visual.path}: expected [N, T, H, W, D] (or [N, T, D]), got shape {visual.shape}")
    if len(audio) != len(visual):
        raise DataError(f"{root}: {audio.path.name} has {len(audio)} rows but {visual.path.name} has {len(visual)}")
    if audio.shape[1] != visual.shape[1]:
        raise DataError(f"{root}: {audio.path.name} has {audio.shape[1]} segments per row, "
                        f"{visual.path.name} has {visual.shape[1]}")
    problems = spec_problems(spec, audio.shape, visual.shape, audio_name=audio.path.name,
                             visual_name=visual.path.name)
    if problems and not use_packed and not (root / SPEC_FILE).is_file():
        # No features.json: the official release is assumed, and arrays of other sizes are features of
        # unknown make; their spec records the dims, so checkpoints still refuse mismatched ones.
        grid = tuple(visual.shape[2:4]) if len(visual.shape) == 5 else ()
        spec = FeatureSpec(StreamSpec("unknown", audio.shape[-1]), StreamSpec("unknown", visual.shape[-1], grid))
        problems = []
    if problems:
        raise DataError(f"{root}: the feature spec does not describe the arrays: {'; '.join(problems)}")
    return FeatureStore(root, audio, visual, spec, "packed" if use_packed else "h5")


def spec_problems(spec: FeatureSpec, audio_shape: tuple, visual_shape: tuple, *,
                  audio_name: str = "audio", visual_name: str = "visual") -> list[str]:
    """Where a store's recorded spec disagrees with its arrays (dims, grid)."""
    problems = []
    if spec.audio.dim != audio_shape[-1]:
        problems.append(f"{audio_name} rows are {audio_shape[-1]}-d, the spec says {spec.audio.dim}")
    if spec.visual.dim != visual_shape[-1]:
        problems.append(f"{visual_name} rows are {visual_shape[-1]}-d, the spec says {spec.visual.dim}")
    grid = tuple(visual_shape[2:4]) if len(visual_shape) == 5 else ()
    if spec.visual.grid and grid and tuple(spec.visual.grid) != grid:
        problems.append(f"{visual_name} grid is {list(grid)}, the spec says {list(spec.visual.grid)}")
    return problems


def pack(root: str | Path, *, dtype: str = "float16", rows_per_chunk: int = 64, progress=None) -> Path:
    """Write the packed layout of ``root`` next to it; resumable (a finished pack is kept)."""
    root = Path(root)
    store = open_store(root, layout="h5")
    out = root / PACKED_DIR
    out.mkdir(exist_ok=True)
    meta_path = out / PACKED_META
    if meta_path.is_file():
        return out
    np_dtype = np.dtype(dtype)
    for name, rows in (("audio", store.audio), ("visual", store.visual)):
        with atomic_output(out / f"{name}.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=rows.shape)
            for lo in range(0, len(rows), rows_per_chunk):
                hi = min(lo + rows_per_chunk, len(rows))
                block = rows.read(np.arange(lo, hi))
                if np_dtype == np.float16 and np.abs(block).max(initial=0) > 65504:
                    raise DataError(f"{rows.path}: values exceed float16 range; pack with dtype float32")
                arr[lo:hi] = block
                if progress:
                    progress(name, hi, len(rows))
            arr.flush()
            del arr
    atomic_write(meta_path, json.dumps({
        "source": {"audio": store.audio.path.name, "visual": store.visual.path.name},
        "dtype": dtype, "rows": len(store), "spec": store.spec.to_dict(),
    }, indent=2))
    return out


def read_small_h5(path: str | Path, key: str = H5_KEY) -> np.ndarray:
    """A small h5 dataset (labels, split orders) read whole; integer-valued where it holds indices."""
    rows = H5Rows(path, key)
    if math.prod(rows.shape) > SMALL_FILE_ELEMENTS:
        raise DataError(f"{rows.path}: {key!r} declares {math.prod(rows.shape):,} elements; a label or split "
                        f"file has at most {SMALL_FILE_ELEMENTS:,}")
    try:
        values = rows.read_all()
    finally:
        rows.close()
    if key == "order" and values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{rows.path}: 'order' holds non-integer row indices")
    return values


# What an AVE-like file can hold: enough for any real dataset, far below what a crafted header can
# declare (a 10 KB file can declare terabytes). Checked before anything is read or allocated.
MAX_ROWS = 10_000_000
MAX_ROW_ELEMENTS = 1 << 24          # one AVE visual row is 10 x 7 x 7 x 512 = 250,880
SMALL_FILE_ELEMENTS = 1 << 26       # labels.h5 of the release: 4,143 x 10 x 29 = 1.2 M


def _check_array(path: Path, key: str, shape: tuple, dtype) -> None:
    """Refuse arrays no AVE reader can use: scalars, strings, complex numbers, absurd sizes."""
    if len(shape) == 0:
        raise DataError(f"{path}: {key!r} is a scalar, not an array of rows")
    if np.dtype(dtype).kind not in "fiub":
        raise DataError(f"{path}: {key!r} has dtype {dtype} (numbers expected: float or integer)")
    if shape[0] > MAX_ROWS or math.prod(shape[1:]) > MAX_ROW_ELEMENTS:
        raise DataError(f"{path}: {key!r} declares shape {list(shape)[:8]}, beyond what avel reads "
                        f"({MAX_ROWS:,} rows of at most {MAX_ROW_ELEMENTS:,} values)")
