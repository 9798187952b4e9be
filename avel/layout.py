"""The AVE file layout: every file and dataset name of an AVE folder, and the one h5 writer.

An AVE data root (the official release, or a folder avel made) holds, row i of every file being
line i of ``Annotations.txt``:

- ``audio_feature.h5`` [N, T, Da], ``visual_feature.h5`` [N, T, H, W, Dv], ``visual_feature_vec.h5``
  [N, T, Dv] (the grid average), ``labels.h5`` [N, T, C], ``mil_labels.h5`` [N, C],
  ``labels_closs.h5`` [N, T]: dataset ``avadataset``;
- ``{split}_order.h5`` (and ``{split}_order_match.h5`` for cross-modal localization): dataset
  ``order``, 0-based rows of ``Annotations.txt``;
- ``*_noisy.h5``: background-only videos for the weak setting (``audio_feature_noisy.h5``...);
- avel's own: ``features.json`` (the feature spec), ``manifest.jsonl`` (what extraction did per row),
  ``categories.txt`` (class order), ``packed/`` (memory-mapped copies of the feature arrays).

Other modules take these names from here, so the layout is spelled out once.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from .io import atomic_output

H5_KEY = "avadataset"          # dataset name in every feature and label file
ORDER_KEY = "order"            # dataset name in the split files

ANNOTATIONS = "Annotations.txt"
VIDEO_FOLDER = "AVE"           # the release's videos, in a folder next to its Annotations.txt
CATEGORIES = "categories.txt"
AUDIO_FEATURES = "audio_feature.h5"
VISUAL_FEATURES = "visual_feature.h5"
VISUAL_VEC_FEATURES = "visual_feature_vec.h5"
LABELS = "labels.h5"
MIL_LABELS = "mil_labels.h5"
CLOSS_LABELS = "labels_closs.h5"
FEATURE_FILES = (AUDIO_FEATURES, VISUAL_FEATURES, VISUAL_VEC_FEATURES)
SPLITS = ("train", "val", "test")

SPEC_FILE = "features.json"
MANIFEST = "manifest.jsonl"
PACKED_DIR = "packed"


def noisy(name: str) -> str:
    """The background-only counterpart of a file: ``audio_feature.h5`` -> ``audio_feature_noisy.h5``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_noisy.{ext}" if dot else f"{name}_noisy"


def split_list(split: str) -> str:
    """``{split}Set.txt``: the annotation lines of one split (as the release's trainSet.txt)."""
    return f"{split}Set.txt"


def order_file(split: str, *, match: bool = False) -> str:
    """``{split}_order.h5``, or ``{split}_order_match.h5`` (the cross-modal task's pairs)."""
    return f"{split}_order{'_match' if match else ''}.h5"


@contextlib.contextmanager
def h5_writer(paths: Sequence[str | Path], shapes: Sequence[tuple[int, ...]], *, key: str = H5_KEY,
              dtype=np.float32, row_chunks: bool = True) -> Iterator[list[h5py.Dataset]]:
    """Open one dataset per file for writing, row by row; the files appear together, whole, on exit.

    Yields the datasets (``ds[i][row] = array``). Each file is written under a temporary name and
    renamed into place when the block ends without error (:func:`avel.io.atomic_output`); on an error
    every temporary is removed and no destination is touched. ``row_chunks`` stores one row per h5
    chunk (what a reader of single rows wants).
    """
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_output(p)) for p in paths]
        files = [h5py.File(t, "w") for t in tmps]
        try:
            yield [f.create_dataset(key, shape=shape, dtype=dtype,
                                    chunks=(1, *shape[1:]) if row_chunks and len(shape) > 1 and shape[0] else None)
                   for f, shape in zip(files, shapes)]
        finally:
            for f in files:     # closed before the renames (or the removals) of the ExitStack
                f.close()


def write_h5(path: str | Path, array: np.ndarray, *, key: str = H5_KEY) -> Path:
    """Write one whole array as dataset ``key`` of ``path`` (atomically); returns ``path``."""
    array = np.asarray(array)
    with h5_writer([path], [array.shape], key=key, dtype=array.dtype, row_chunks=False) as (ds,):
        ds[...] = array
    return Path(path)


def write_rows(root: str | Path, n: int, audio_shape: tuple, visual_shape: tuple,
               rows: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> None:
    """The three feature files of ``root`` (audio, visual, visual grid average), ``n`` rows of float32,
    filled from ``(row, audio [T, Da], visual [T, ..., Dv])`` triples in any order."""
    root = Path(root)
    vec_shape = (visual_shape[0], visual_shape[-1])
    with h5_writer([root / name for name in FEATURE_FILES],
                   [(n, *audio_shape), (n, *visual_shape), (n, *vec_shape)]) as (da, dv, dvec):
        for i, audio, visual in rows:
            da[i] = audio
            dv[i] = visual
            dvec[i] = grid_mean(visual)


def grid_mean(visual: np.ndarray) -> np.ndarray:
    """[T, H, W, Dv] -> [T, Dv] (the average over the grid, as ``visual_feature_vec.h5``); [T, Dv] stays."""
    return visual.reshape(visual.shape[0], -1, visual.shape[-1]).mean(1) if visual.ndim > 2 else visual
