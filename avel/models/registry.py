"""Model registry: a leaf module of one dict and one decorator (``avel.models`` imports the implementations).

The trainer, evaluator, localizer and checkpoint loader only ever call :func:`build_model` with the
name and keyword arguments stored in a model card; they never branch on a model's name. What a model
returns is declared on its class (``outputs``), so callers read the declaration instead of probing.

The model contract (tested over the whole registry in tests/test_models.py):
- keyword-only constructor; dimensions (``audio_dim``, ``visual_dim``, ``grid``, ``num_classes``) come
  from the data, the rest are the model's hyper-parameters with the authors' values as defaults;
- ``forward(audio [B, T, Da], visual [B, T, H, W, Dv]) -> dict`` with exactly the keys of ``outputs``;
- a segment model returns ``segment_scores`` [B, T, C] whose per-segment argmax is its own decision
  rule, plus raw outputs under the shared names ``logits`` [B, T, C], ``event_logits`` [B, T],
  ``class_logits`` [B, C-1], ``video_logits`` [B, C], ``attention`` [B, T, H, W];
- the loss-term hook: a model may define ``loss_terms(out, batch, task) -> {name: [B] tensor}`` (its
  unweighted terms, per video) with class attribute ``loss_weights = {name: weight}``; the task then
  trains on ``sum(weight * term)`` instead of its default loss, and the loop logs every term;
- ``tasks`` (class attribute): the tasks it trains in (default: supervised and weak for segment models);
- a model that reads its authors' checkpoints declares ``reference_classes`` (pickled class names)
  and a static ``convert_reference(state_dict) -> (kwargs, state_dict)`` used by ``avel.compat``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` buildable as ``build_model(name, **kwargs)``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
        if not isinstance(getattr(cls, "outputs", None), tuple):
            raise TypeError(f"model {name!r}: the class must declare `outputs` (a tuple of the keys it returns)")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def model_class(name: str) -> type[nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def model_name(cls: type[nn.Module]) -> str:
    """The registry name of a model class (for messages)."""
    return next((n for n, c in _REGISTRY.items() if c is cls), cls.__name__)


def model_arguments(name: str) -> dict[str, object]:
    """The constructor's keyword arguments with their defaults (what a config may set)."""
    sig = inspect.signature(model_class(name).__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def complete_arguments(name: str, kwargs: dict) -> dict:
    """``kwargs`` checked against the constructor and completed with its defaults (what a card stores)."""
    allowed = model_arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"model {name!r} takes no argument(s) {unknown}; it takes {sorted(allowed)}")
    full = {k: v for k, v in allowed.items() if v is not inspect.Parameter.empty}
    full.update({k: tuple(v) if k == "grid" else v for k, v in kwargs.items()})
    return full


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Unknown keyword arguments are an error, not silently dropped."""
    return model_class(name)(**complete_arguments(name, kwargs))
