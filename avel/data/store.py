"""Feature files: the official h5 layout read lazily, and a packed memory-mapped layout.

Official layout (a folder): ``audio_feature.h5`` [N, T, Da], ``visual_feature.h5`` [N, T, H, W, Dv],
each with the dataset ``avadataset`` (float32 or float64), row i = line i of ``Annotations.txt``.
Nothing here ever loads a whole feature file: rows are read on demand, in sorted order (h5py needs
increasing indices), converted to float32 and put back in the order asked for.

Packed layout (``avel data pack``): ``<root>/packed/{audio,visual}.npy`` (float16 by default,
contiguous, opened with ``mmap_mode='r'``) plus ``packed.json`` recording the source, dtype and
feature spec. Same rows, same order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..features.spec import AVE_OFFICIAL, FeatureSpec
from .errors import DataError

H5_KEY = "avadataset"
SPEC_FILE = "features.json"
PACKED_DIR = "packed"


class H5Rows:
    """Lazy row access to one dataset of an h5 file. Opens the file on first use in each process."""

    def __init__(self, path: str | Path, key: str = H5_KEY):
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        try:
            with h5py.File(self.path, "r") as f:
                if key not in f:
                    raise DataError(f"{self.path}: no dataset {key!r} (has: {', '.join(f.keys()) or 'nothing'})")
                ds = f[key]
                self.shape = tuple(ds.shape)
                self.dtype = ds.dtype
        except OSError as e:
            raise DataError(f"{self.path}: not a readable HDF5 file ({e})") from None
        self._file = None
        self._pid = None

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
        out = np.empty((len(uniq), *self.shape[1:]), dtype=np.float32)
        # Contiguous runs are read as one hyperslab each: cheap for sorted/sequential access.
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        pos = 0
        for run in np.split(uniq, breaks) if len(uniq) else []:
            out[pos:pos + len(run)] = ds[run[0]:run[-1] + 1]
            pos += len(run)
        return out[inverse]

    def read_all(self) -> np.ndarray:
        """For small files only (labels, orders)."""
        return np.asarray(self._dataset()[()])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state


class NpyRows:
    """Row access to a memory-mapped .npy array; returns float32."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        self._array = np.load(self.path, mmap_mode="r")
        self.shape = tuple(self._array.shape)
        self.dtype = self._array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise DataError(f"{self.path}: row index out of range [0, {self.shape[0]}): {idx.min()}..{idx.max()}")
        return self._array[idx].astype(np.float32)

    def read_all(self) -> np.ndarray:
        return np.asarray(self._array, dtype=np.float32)


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
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(Path(root) / SPEC_FILE, json.dumps({"spec": spec.to_dict(), **extra}, indent=2))


def open_store(root: str | Path, *, layout: str = "auto", audio_file: str = "audio_feature.h5",
               visual_file: str = "visual_feature.h5") -> FeatureStore:
    """Open a feature folder. ``layout``: 'auto' (packed when present), 'h5' or 'packed'."""
    root = Path(root)
    packed = root / PACKED_DIR
    if layout not in {"auto", "h5", "packed"}:
        raise ValueError(f"layout must be auto, h5 or packed, not {layout!r}")
    use_packed = layout == "packed" or (layout == "auto" and (packed / "packed.json").is_file()
                                        and audio_file == "audio_feature.h5")
    if use_packed:
        if not (packed / "packed.json").is_file():
            raise DataError(f"{packed}: no packed layout here (run `avel data pack {root}`)")
        meta = json.loads((packed / "packed.json").read_text())
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
    return FeatureStore(root, audio, visual, spec, "packed" if use_packed else "h5")


def pack(root: str | Path, *, dtype: str = "float16", rows_per_chunk: int = 64, progress=None) -> Path:
    """Write the packed layout of ``root`` next to it; resumable (a finished pack is kept)."""
    from ..engine.checkpoint import atomic_write_text

    root = Path(root)
    store = open_store(root, layout="h5")
    out = root / PACKED_DIR
    out.mkdir(exist_ok=True)
    meta_path = out / "packed.json"
    if meta_path.is_file():
        return out
    np_dtype = np.dtype(dtype)
    for name, rows in (("audio", store.audio), ("visual", store.visual)):
        tmp = out / f"{name}.npy.partial"
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
        os.replace(tmp, out / f"{name}.npy")
    atomic_write_text(meta_path, json.dumps({
        "source": {"audio": store.audio.path.name, "visual": store.visual.path.name},
        "dtype": dtype, "rows": len(store), "spec": store.spec.to_dict(),
    }, indent=2))
    return out


def read_small_h5(path: str | Path, key: str = H5_KEY) -> np.ndarray:
    """A small h5 dataset (labels, split orders) read whole."""
    rows = H5Rows(path, key)
    try:
        return rows.read_all()
    finally:
        rows.close()
