"""Row sources and the batch loader.

A *row source* is anything with ``__len__`` and ``read(indices) -> dict[str, np.ndarray]``. The
AVE folder (:class:`AVEData`) hands out sources for each task; :class:`Batches` turns any source
into shuffled (or not), rank-sharded, prefetched batches of torch tensors. No torch Dataset /
DataLoader per-item overhead: a whole batch of rows is one sorted read.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .annotations import AnnotationSet, class_order, parse_annotations, segment_labels
from .errors import DataError
from .store import FeatureStore, H5Rows, open_store, read_small_h5

SPLITS = ("train", "val", "test")


@dataclass
class AVEData:
    """An opened AVE-layout folder: annotations, features, labels, splits."""

    root: Path
    annotations: AnnotationSet
    store: FeatureStore

    @classmethod
    def open(cls, root: str | Path, *, layout: str = "auto") -> AVEData:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
        path = _find(root, "Annotations.txt")
        ann = parse_annotations(path)
        order = class_order(root, list(ann.categories))
        if order is not None and list(order) != list(ann.categories):
            ann = parse_annotations(path, order)   # fixed class indices: a subset keeps the release's
        store = open_store(root, layout=layout)
        if len(store) != len(ann):
            raise DataError(f"{store.audio.path}: {len(store)} rows, but {ann.path} has {len(ann)} annotation rows")
        return cls(root, ann, store)

    @property
    def segments(self) -> int:
        return self.store.segments

    @property
    def class_names(self) -> list[str]:
        return self.annotations.class_names

    @property
    def num_classes(self) -> int:
        return self.annotations.num_classes

    def _label_file(self, name: str, shape: tuple[int, ...], derive) -> np.ndarray:
        """The official label file ``name`` when present (its shape checked), else ``derive()``."""
        path = self.root / name
        if not path.is_file():
            return derive()
        labels = read_small_h5(path).astype(np.float32)
        if labels.shape != shape:
            raise DataError(f"{path}: shape {labels.shape}, expected {shape} from the annotations and features")
        return labels

    @cached_property
    def targets(self) -> np.ndarray:
        """Per-segment one-hot targets [N, T, C]: labels.h5 when present, else built from spans."""
        return self._label_file("labels.h5", (len(self.annotations), self.segments, self.num_classes),
                                lambda: segment_labels(self.annotations, self.segments))

    @cached_property
    def video_labels(self) -> np.ndarray:
        """One-hot video class [N, C]: mil_labels.h5 when present, else the annotated category."""
        def from_annotations():
            out = np.zeros((len(self.annotations), self.num_classes), np.float32)
            out[np.arange(len(out)), self.annotations.class_indices()] = 1.0
            return out

        return self._label_file("mil_labels.h5", (len(self.annotations), self.num_classes), from_annotations)

    @cached_property
    def event_mask(self) -> np.ndarray:
        """[N, T] 1 inside the event: labels_closs.h5 when present, else from the segment targets."""
        return self._label_file("labels_closs.h5", (len(self.annotations), self.segments),
                                lambda: (self.targets.argmax(-1) != self.annotations.background).astype(np.float32))

    def split(self, name: str, *, match: bool = False) -> np.ndarray:
        """Row indices of a split, from ``{name}_order.h5`` (``{name}_order_match.h5`` for cross-modal)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {name!r}")
        path = self.root / f"{name}_order{'_match' if match else ''}.h5"
        if not path.is_file() and match:
            path = self.root / f"{name}_order.h5"
        if not path.is_file():
            raise DataError(f"{path}: split file not found")
        order = read_small_h5(path, "order").astype(np.int64).reshape(-1)
        bad = order[(order < 0) | (order >= len(self.annotations))]
        if bad.size:
            raise DataError(f"{path}: order index {int(bad[0])} out of range [0, {len(self.annotations)})")
        return order

    def visual_vectors(self) -> H5Rows | None:
        path = self.root / "visual_feature_vec.h5"
        if not path.is_file():
            return None
        rows = H5Rows(path)
        want = (len(self.annotations), self.segments, self.store.visual.shape[-1])
        if rows.shape != want:
            raise DataError(f"{path}: shape {rows.shape}, expected {want} from the annotations and visual features")
        return rows


def _find(root: Path, name: str) -> Path:
    path = root / name
    if path.is_file():
        return path
    lower = {p.name.lower(): p for p in root.iterdir()}
    if name.lower() in lower:
        return lower[name.lower()]
    raise DataError(f"{path}: file not found")


# --- row sources -------------------------------------------------------------------------------

@dataclass
class SegmentRows:
    """Rows of a feature store with per-segment targets and video labels."""

    store: FeatureStore
    targets: np.ndarray              # [N, T, C]
    video_labels: np.ndarray         # [N, C]
    rows: np.ndarray                 # which store rows this source exposes, in order

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices) -> dict[str, np.ndarray]:
        rows = self.rows[np.asarray(indices)]
        batch = self.store.read(rows)
        if batch["visual"].ndim == 3:                       # vector features [b, T, D] -> a 1x1 grid
            batch["visual"] = batch["visual"][:, :, None, None, :]
        batch["target"] = self.targets[rows]
        batch["video_label"] = self.video_labels[rows]
        batch["index"] = rows
        return batch

    def first_nonfinite(self, chunk: int = 64) -> str | None:
        """Where the first NaN/Inf feature value of these rows is ("FILE: row R"), or None."""
        for lo in range(0, len(self.rows), chunk):
            batch = self.store.read(self.rows[lo:lo + chunk])
            for name in ("audio", "visual"):
                bad = ~np.isfinite(batch[name].reshape(len(batch[name]), -1)).all(axis=1)
                if bad.any():
                    row = int(self.rows[lo + int(np.argmax(bad))])
                    return f"{getattr(self.store, name).path}: row {row} has NaN/Inf {name} features"
        return None


@dataclass
class ConcatRows:
    """Several sources one after another (AVE training videos + background-only videos)."""

    sources: list

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        parts, order = [], []
        for s, source in enumerate(self.sources):
            sel = np.flatnonzero(which == s)
            if sel.size:
                parts.append(source.read(indices[sel] - self.offsets[s]))
                order.append(sel)
        inverse = np.argsort(np.concatenate(order), kind="stable")
        return {k: np.concatenate([p[k] for p in parts])[inverse] for k in parts[0]}


@dataclass
class PairRows:
    """(visual second t, audio second t) pairs for cross-modal matching: item = row * T + t."""

    audio: object                    # rows [N, T, Da]
    visual_vec: object               # rows [N, T, Dv]
    event_mask: np.ndarray           # [N, T]
    rows: np.ndarray
    segments: int

    def __len__(self) -> int:
        return len(self.rows) * self.segments

    def read(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        rows, t = self.rows[indices // self.segments], indices % self.segments
        uniq, inv = np.unique(rows, return_inverse=True)
        audio, visual = self.audio.read(uniq)[inv, t], self.visual_vec.read(uniq)[inv, t]
        return {"audio": audio, "visual": visual, "target": self.event_mask[rows, t], "index": indices}


@dataclass
class GridMeanRows:
    """Visual maps [N, T, H, W, D] read through a store, averaged over the grid -> [N, T, D]."""

    visual: object

    def __len__(self) -> int:
        return len(self.visual)

    def read(self, indices) -> np.ndarray:
        v = self.visual.read(indices)
        return v.mean(axis=(2, 3)) if v.ndim == 5 else v


# --- batches -----------------------------------------------------------------------------------

@dataclass
class Batches:
    """Batches of a row source as torch tensors.

    Every rank draws the same permutation (seed + epoch) and takes its own slice of each global
    batch, so N processes see exactly the rows one process would. ``prefetch`` reads the next
    batch in a background thread while the model works on the current one.
    """

    source: object
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world: int = 1
    prefetch: int = 2
    pin_memory: bool = False         # page-locked batches for fast, asynchronous copies to a GPU
    epoch: int = field(default=0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        n = len(self.source)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self) -> int:
        return len(self.global_batches())

    def _items(self):
        for glob in self.global_batches():
            local = glob[self.rank::self.world]
            batch = self.source.read(local) if len(local) else None
            yield _to_torch(batch, self.pin_memory) if batch is not None else {}, len(glob)

    def __iter__(self):
        """Yields (batch dict of tensors for this rank, global batch size)."""
        if self.prefetch <= 0:
            yield from self._items()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker():
            try:
                for item in self._items():
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(None)
            except BaseException as e:  # hand the error to the consumer
                q.put(e)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def auto_prefetch(device="cpu") -> int:
    """How many batches to read ahead in a background thread for a model running on ``device``.

    2 when the model leaves a core free (a GPU, or fewer torch threads than cores); 0 when every
    core already runs the model: a reader thread then preempts OpenMP workers, whose barriers stall
    while one of them is off its core, and that costs more than the read it hides (2-core CPU, A+V-att
    epoch, packed: 1.10x the in-memory time with read-ahead, 1.00x without; float64 h5: 1.55x vs 1.37x).
    """
    if not str(device).startswith("cpu"):
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return 2 if busy < cores else 0


def _to_torch(batch: dict[str, np.ndarray], pin: bool = False) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out
