"""Checkpoints: ``model.safetensors`` + ``config.json`` in a folder, written atomically.

``config.json`` holds the model name and constructor arguments, class names, feature spec, avel
version and training facts; :func:`load` rebuilds the model from that alone. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(folder: str | Path, model: nn.Module, **info) -> Path:
    """Write ``model`` (built by ``build_model``) and ``info`` (JSON-serialisable) into ``folder``.

    The weights are written first and the config last, so a folder with a config always has
    matching weights; both writes are atomic.
    """
    from .. import __version__

    spec = getattr(model, "avel_spec", None)
    if spec is None:
        raise ValueError("model was not built by avel.build_model: its name and arguments are unknown")
    folder = Path(folder)
    atomic_save_tensors(folder / WEIGHTS, model.state_dict())
    config = {"model": spec["name"], "model_kwargs": _jsonable(spec["kwargs"]), "avel_version": __version__, **info}
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2, default=_jsonable))
    return folder


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint config here (expected {CONFIG} + {WEIGHTS})")
    return json.loads(path.read_text())


def load(folder: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from ``config.json`` and load its weights; returns it in eval mode.

    The config is attached as ``model.avel_config`` (class names, feature spec, training facts).
    """
    from ..models import build_model

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    config = read_config(folder)
    model = build_model(config["model"], **config.get("model_kwargs", {}))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint weights missing")
    state = load_file(str(weights), device=str(map_location))
    model.load_state_dict(state)
    model.avel_config = config
    return model.to(map_location).eval()


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    return value


# --- resumable training state (no pickle: tensors in safetensors, structure in JSON) ------------

def save_training_state(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, info: dict) -> None:
    """Everything a killed run needs to continue exactly: weights, optimizer moments, schedule."""
    folder = Path(folder)
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars: dict[str, dict] = {}
    for pid, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_tensors(folder / "state.safetensors", tensors)
    meta = {"param_groups": opt["param_groups"], "optim_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None, **info}
    atomic_write_text(folder / "state.json", json.dumps(meta, indent=2, default=_jsonable))


def load_training_state(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler) -> dict | None:
    """Restore what :func:`save_training_state` wrote; returns its info dict (None if absent)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        return None
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, slots in meta.get("optim_scalars", {}).items():
        state.setdefault(int(pid), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return meta
