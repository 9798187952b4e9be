"""Reference AVE checkpoints -> equivalent avel models, without running pickled code.

Two families of files are read (see :mod:`avel.compat.readers` for the byte formats):

- the 2018 release (``AV_att.pt``, ``AV_att_weak.pt``, ``DMRN.pt``): whole ``nn.Module`` objects
  pickled by PyTorch 0.3, converted here to the ``av_att`` / ``dmrn`` models;
- the follow-up repositories (PSP, CPSP, AVSDN, CMRAN, CMBS): whole pickled modules or the state
  dicts of ``nn.DataParallel`` wrappers. Each avel model class declares its own format
  (``reference_classes`` and ``convert_reference``), so this loader has no per-model branches.

Pipeline: restricted read -> state dict -> strip a uniform ``module.`` prefix -> converter of the
kind -> parameter-free (meta device) build to check names and shapes -> build -> strict load -> eval.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..card import Loaded, ModelCard
from ..data.annotations import ave_categories
from ..models import build_model
from ..models.registry import available_models, complete_arguments, model_class
from ..spec import AVE_OFFICIAL
from .keras import load_keras_cml
from .limits import (
    DEFAULT_LIMITS,
    Limits,
    OriginalCheckpointError,
    UnsafeCheckpointError,
    brief,
)
from .readers import OFFICIAL_CLASSES, OriginalCheckpoint, class_kinds, read_original

__all__ = ["KINDS", "OFFICIAL_CLASSES", "OriginalCheckpoint", "OriginalCheckpointError",
           "UnsafeCheckpointError", "ave_class_names", "convert_original", "kinds", "load_original",
           "read_original"]

log = logging.getLogger(__name__)

KINDS = ("av_att", "av_att_weak", "dmrn")     # the 2018 kinds (converted here)
_DP_PREFIX = "module."
# What a converter may raise on a state dict that is not its model's.
_CONVERT_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError)

Converted = tuple[str, dict[str, Any], dict[str, torch.Tensor]]    # (registry name, kwargs, avel state dict)


# ------------------------------------------------------------------------------- 2018 release


_ATTENTION = ("affine_audio.", "affine_video.", "affine_v.", "affine_g.", "affine_h.")


def _shape(sd: dict, name: str) -> torch.Size:
    if name not in sd:
        raise ValueError(f"required parameter {name!r} is missing")
    return sd[name].shape


def _convert_2018(kind: str, sd: dict, extra: dict) -> Converted:
    model = "dmrn" if kind == "dmrn" else "av_att"
    att_hidden, audio_dim = _shape(sd, "affine_audio.weight")
    _, visual_dim = _shape(sd, "affine_video.weight")
    regions = _shape(sd, "affine_v.weight")[0]
    side = math.isqrt(regions)
    if side * side != regions:
        raise ValueError(f"{regions} attention regions do not form a square grid")
    kwargs: dict[str, Any] = dict(audio_dim=audio_dim, visual_dim=visual_dim, grid=(side, side),
                                  num_classes=_shape(sd, "L2.weight")[0],
                                  hidden=_shape(sd, "lstm_audio.weight_hh_l0")[1], att_hidden=att_hidden)
    if model == "av_att":
        kwargs["head_hidden"] = _shape(sd, "L1.weight")[0]
    else:
        blocks = extra.get("nb_block", 1)
        if type(blocks) is not int or not 1 <= blocks <= 64:
            raise ValueError(f"nb_block {brief(blocks)} is not a block count in 1..64")
        kwargs["blocks"] = blocks

    def rename(name: str) -> str:
        if name.startswith(_ATTENTION):
            return f"attention.{name}"
        if model == "av_att" and name.startswith(("L1.", "L2.")):
            return f"head.{name}"
        return name

    return model, kwargs, {rename(k): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------ kinds


def kinds() -> tuple[str, ...]:
    """Every kind ``load_original`` accepts: the 2018 ones and each registered model with a converter."""
    return KINDS + tuple(n for n in available_models() if callable(getattr(model_class(n), "convert_reference", None)))


def _converter(kind: str, extra: dict) -> Callable[[dict], Converted]:
    if kind in KINDS:
        return lambda sd: _convert_2018(kind, sd, extra)
    convert = model_class(kind).convert_reference

    def run(sd: dict) -> Converted:
        kwargs, converted = convert(sd)
        return kind, kwargs, converted

    return run


def _strip_prefix(sd: dict) -> dict:
    """The state dict of an ``nn.DataParallel`` wrapper has every key under ``module.``."""
    if sd and all(k.startswith(_DP_PREFIX) for k in sd):
        return {k[len(_DP_PREFIX):]: v for k, v in sd.items()}
    return sd


def _names(names: list[str]) -> str:
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return "[" + ", ".join(repr(n[:200]) for n in names[:10]) + "]" + more


def _check_against_model(name: str, kwargs: dict, sd: dict, source: str) -> None:
    """Compare names and shapes with a parameter-free build, so nothing large is allocated on a mismatch."""
    try:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in build_model(name, **kwargs).state_dict().items()}
    except (NotImplementedError, RuntimeError) as e:     # a model that cannot be built on meta
        log.debug("%s: no meta build of %s (%s); checking after the real build", source, name, brief(str(e)))
        return
    unexpected = [k for k in sd if k not in expected]
    missing = [k for k in expected if k not in sd]
    if unexpected or missing:
        parts = [f"unknown parameters {_names(unexpected)}"] if unexpected else []
        parts += [f"missing parameters {_names(missing)}"] if missing else []
        raise OriginalCheckpointError(f"{source}: does not match avel model {name!r}: {'; '.join(parts)}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in sd.items() if v.shape != expected[k]]
    if bad:
        raise OriginalCheckpointError(f"{source}: parameter shapes do not match: {brief(bad[:10], 400)}")


def _convert(kind: str, ckpt: OriginalCheckpoint, sd: dict) -> Converted:
    source = str(ckpt.path)
    try:
        name, kwargs, converted = _converter(kind, ckpt.extra)(sd)
    except _CONVERT_ERRORS as e:
        raise OriginalCheckpointError(f"{source}: does not fit avel model {kind!r}: "
                                      f"{brief(e.args[0] if e.args else e, 300)}") from None
    _check_against_model(name, kwargs, converted, source)
    return name, kwargs, converted


def _detect(ckpt: OriginalCheckpoint, sd: dict) -> str:
    """The kind of a file that did not say what it is (or whose class several kinds read)."""
    source = str(ckpt.path)
    if ckpt.kind not in ("state_dict", "module"):
        return ckpt.kind
    if ckpt.kind == "module":
        candidates = class_kinds()[ckpt.class_name]
    else:
        # The 2018 rule (a DMRN has U_v.* keys) names one 2018 candidate; every registered converter
        # is another. A candidate counts only if its conversion fits the model exactly.
        first = "dmrn" if any(k.startswith("U_v.") for k in sd) else "av_att"
        candidates = (first,) + kinds()[len(KINDS):]
    fitting, reasons = [], []
    for kind in candidates:
        try:
            _convert(kind, ckpt, sd)
        except OriginalCheckpointError as e:
            reasons.append(f"as {kind}: {str(e).removeprefix(source + ': ')}")
            continue
        fitting.append(kind)
    if len(fitting) == 1:
        return fitting[0]
    what = f"class {ckpt.class_name}" if ckpt.class_name else "state dict"
    if not fitting:
        raise OriginalCheckpointError(
            f"{source}: this {what} fits no avel model ({reasons[0]}); pass kind= one of {', '.join(kinds())}")
    raise OriginalCheckpointError(
        f"{source}: this {what} fits several avel models ({', '.join(fitting)}); pass kind= one of them")


def load_original(path: str | Path, *, kind: str | None = None, dtype: torch.dtype | None = None,
                  task: str | None = None, limits: Limits = DEFAULT_LIMITS) -> Loaded:
    """Reference checkpoint -> ``(model, card)``: the equivalent avel model in eval mode and its card.

    ``kind`` is a 2018 kind ('av_att', 'av_att_weak', 'dmrn') or the registry name of a model with a
    reference converter ('psp', 'cmbs', ...); it may be omitted when the file says what it is (a whole
    pickled module) or when exactly one model fits a state dict's keys. ``dtype`` is the model's
    floating dtype (None: float32; the follow-up files are float64 and are cast unless asked).
    ``task`` is recorded in the card: by default the weak task for weak kinds, else the model's first.
    The card records where the weights came from (``card.source``) and that they expect the official
    AVE features and class order.
    """
    valid = kinds()
    if kind is not None and kind not in valid:
        raise ValueError(f"kind must be one of {valid}, got {brief(kind)}")
    dtype = dtype or torch.float32
    ckpt = read_original(path, dtype=dtype, limits=limits)
    source = str(ckpt.path)
    sd = _strip_prefix(ckpt.state_dict)
    if kind is None:
        kind = _detect(ckpt, sd)
    elif ckpt.kind not in ("state_dict", "module") and kind != ckpt.kind:
        log.warning("%s: file holds %s but kind=%r was asked for", source, ckpt.class_name, kind)
    name, kwargs, converted = _convert(kind, ckpt, sd)
    try:
        model = build_model(name, **kwargs).to(dtype)      # cast first: loading keeps the file's precision
        model.load_state_dict(converted, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise OriginalCheckpointError(f"{source}: does not load into avel model {name!r}: "
                                      f"{brief(str(e), 400)}") from None
    model.eval()
    supported = getattr(model_class(name), "tasks", ("supervised", "weak"))
    task = task or ("weak" if kind.endswith("_weak") else supported[0])
    if task not in supported:
        raise ValueError(f"task {task!r}: model {name!r} trains {'/'.join(supported)}")
    card = ModelCard(model=name, model_kwargs=complete_arguments(name, kwargs), task=task,
                     class_names=ave_class_names(), feature_spec=AVE_OFFICIAL, outputs=model_class(name).outputs,
                     source={"path": source, "kind": kind, "class": ckpt.class_name, "format": ckpt.format})
    return Loaded(model, card)


def ave_class_names() -> tuple[str, ...]:
    """The official AVE class list: the 28 categories in release order, then background."""
    return (*ave_categories(), "background")


def convert_original(path: str | Path, *, kind: str | None = None, dtype: torch.dtype | None = None,
                     task: str | None = None) -> Loaded:
    """Any official or reference weights file -> ``(model, card)``: Keras CML weights (``.h5``) or a
    PyTorch checkpoint of the 2018 release or a follow-up repository (``.pt``, ``.pth``, ``.pth.tar``)."""
    if Path(path).suffix.lower() in (".h5", ".hdf5"):
        if kind not in (None, "cml"):
            raise ValueError(f"{path}: Keras weights hold the cml model, not {kind!r}")
        return load_keras_cml(path)
    return load_original(path, kind=kind, dtype=dtype, task=task)
