"""Helpers for the core tests: small synthetic AVE folders and quick run configs."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import load_file

from avel.config import RunConfig, recipe
from avel.data.synth import SynthConfig, generate

TINY_MODEL = {"hidden": 8, "att_hidden": 8, "head_hidden": 8}


def synth(root: Path, **kw) -> Path:
    """A small synthetic AVE folder (defaults: 60 videos, 16-d, 3x3 grid, 3 classes)."""
    cfg = dict(videos=60, classes=3, audio_dim=16, visual_dim=16, grid=(3, 3), background_videos=10, seed=0)
    cfg.update(kw)
    return generate(root, SynthConfig(**cfg))


def quick_config(root: Path, *, task: str = "supervised", recipe_name: str = "original", **kw) -> RunConfig:
    """A run config that trains in about a second on a ``synth`` folder."""
    c = recipe(recipe_name, task)
    base = dict(epochs=4, eval_every=1, threads=1)
    if task != "cml":                       # cml keeps the recipe's batch of 8 pairs
        base.update(batch_size=16, model_kwargs=dict(TINY_MODEL))
    base.update(kw)
    return replace(c, data=replace(c.data, root=str(root)), **base)


def read_jsonl(path: Path, drop=("train_seconds", "val_seconds")) -> list[dict]:
    """metrics.jsonl records without their wall-clock timings (which differ run to run)."""
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        for k in drop:
            rec.pop(k, None)
        out.append(rec)
    return out


def write_h5(path: Path, array, key: str = "avadataset") -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=np.asarray(array))


def small_folder(tmp_path_factory) -> Path:
    """The 60-video synthetic folder the engine tests share (no background videos)."""
    return synth(tmp_path_factory.mktemp("engine") / "ave", videos=60, background_videos=0)


def weights(folder: Path) -> dict:
    """The tensors of a checkpoint folder's model.safetensors."""
    return load_file(str(Path(folder) / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
