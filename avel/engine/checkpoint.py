"""Checkpoints: ``model.safetensors`` + ``config.json`` in a folder. No pickle anywhere.

The model card (:class:`avel.card.ModelCard`) is written twice on purpose: inside the safetensors
header (the copy :func:`load` trusts: weights and card are one file, renamed into place in one step,
so a kill can never pair new weights with an old card) and as ``config.json`` (the copy people and
older avel versions read). Loading checks the file before building anything big: the card must parse,
the constructor arguments must be the model's, and every tensor's name and shape must match what the
model would build (checked on the ``meta`` device, which allocates nothing).

Resumable training state is one file too: ``last/state.safetensors`` holds the weights, optimizer
moments and RNG state, and its header holds the epoch counter, schedule and history, so a resume
never sees weights of one epoch with the counter of another.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..card import CardError, Loaded, ModelCard
from ..io import atomic_output, atomic_write
from ..models.registry import build_model, model_arguments

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.safetensors"
_CARD_KEY = "avel_card"
_STATE_KEY = "avel_state"


class CheckpointError(ValueError):
    """An avel checkpoint folder that cannot be read or does not fit its model; names the file."""


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (CPU, contiguous copies)."""
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save(folder: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write ``model``'s weights with ``card`` into ``folder`` (each file atomic, weights first)."""
    folder = Path(folder)
    text = json.dumps(card.to_dict(), indent=2)
    save_tensors(folder / WEIGHTS, model.state_dict(), metadata={_CARD_KEY: text})
    atomic_write(folder / CONFIG, text + "\n")
    return folder


def _folder(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint folder here (expected {CONFIG} + {WEIGHTS})")
    return path


def read_card(path: str | Path) -> ModelCard:
    """The card of a checkpoint folder (from the weights file's header, else ``config.json``)."""
    folder = _folder(path)
    header = _header(folder / WEIGHTS) if (folder / WEIGHTS).is_file() else None
    if header is not None and _CARD_KEY in header[0]:
        return _parse_card(header[0][_CARD_KEY], folder / WEIGHTS)
    config = folder / CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no checkpoint config here (expected {CONFIG} + {WEIGHTS})")
    try:
        text = config.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config}: cannot be read ({e})") from None
    return _parse_card(text, config)


def _parse_card(text: str, where: Path) -> ModelCard:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not JSON ({e})") from None
    try:
        return ModelCard.from_dict(raw, where=str(where))
    except CardError as e:
        raise CheckpointError(str(e)) from None


def _header(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """(metadata, name -> (dtype, shape)) of a safetensors file, reading only its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {}
            for k in f.keys():
                s = f.get_slice(k)
                shapes[k] = (s.get_dtype(), tuple(s.get_shape()))
        return meta, shapes
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def build_from_card(card: ModelCard, *, device: str | torch.device = "cpu", where: str = "checkpoint") -> nn.Module:
    """Build the card's model with its constructor arguments; bad names or values name the field."""
    try:
        allowed = model_arguments(card.model)
    except KeyError as e:
        raise CheckpointError(f"{where}: {e.args[0]}") from None
    unknown = sorted(set(card.model_kwargs) - set(allowed))
    if unknown:
        raise CheckpointError(f"{where}: model_kwargs {unknown} are not arguments of {card.model!r} "
                              f"(it takes {sorted(allowed)})")
    for name, value in card.model_kwargs.items():
        default = allowed[name]
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, (int, float)) and not isinstance(value, (int, float))):
            raise CheckpointError(f"{where}: model_kwargs.{name} = {str(value)[:80]!r} has the wrong type "
                                  f"(default {default!r})")
    try:
        with torch.device(device):
            return build_model(card.model, **card.model_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: cannot build {card.model!r} from its model_kwargs ({e})") from None


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from its card and load its weights; returns ``(model, card)``, model in eval mode."""
    folder = _folder(path)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint weights missing")
    card = read_card(folder)
    _, shapes = _header(weights)
    # Compare names and shapes on the meta device first: a card asking for a huge model, or a file
    # whose tensors do not fit, fails here without allocating anything.
    skeleton = build_from_card(card, device="meta", where=str(folder / CONFIG))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton
    problems = []
    if missing := sorted(set(expected) - set(shapes)):
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := sorted(set(shapes) - set(expected)):
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    bad = [f"{k} {list(shapes[k][1])} (model: {list(v)})" for k, v in expected.items()
           if k in shapes and shapes[k][1] != v]
    if bad:
        problems.append(f"wrong shapes {bad[:5]}")
    if problems:
        raise CheckpointError(f"{weights}: does not fit model {card.model!r}: {'; '.join(problems)}")
    model = build_from_card(card, where=str(folder / CONFIG))
    try:
        with safe_open(str(weights), framework="pt", device=str(map_location)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: cannot read the tensors ({type(e).__name__}: {e})") from None
    model.load_state_dict(state)
    return Loaded(model.to(map_location).eval(), card)


# --- resumable training state (no pickle: tensors and JSON in one safetensors file) ----------------

def save_training_state(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, info: dict, average: nn.Module | None = None) -> None:
    """Everything a killed run needs to continue exactly, written as ONE file (one atomic rename).

    ``average`` is the run's moving average of the weights, when it keeps one.
    """
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"average.{k}": v for k, v in average.state_dict().items()})
    scalars: dict[str, dict] = {}
    for pid, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"param_groups": opt["param_groups"], "optim_scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None, **info}
    save_tensors(Path(folder) / STATE, tensors, metadata={_STATE_KEY: json.dumps(meta, default=_plain)})


def load_training_state(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, average: nn.Module | None = None) -> dict | None:
    """Restore what :func:`save_training_state` wrote; returns its info dict (None if absent)."""
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    meta_raw, _ = _header(path)
    if _STATE_KEY not in meta_raw:
        raise CheckpointError(f"{path}: not an avel training state (no {_STATE_KEY!r} header)")
    try:
        meta = json.loads(meta_raw[_STATE_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed training state header ({e})") from None
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        if not any(k.startswith("average.") for k in tensors):
            raise CheckpointError(f"{path}: the run kept no average of the weights to resume")
        average.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("average.")})
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


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)
