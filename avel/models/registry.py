"""Model registry: names map to builder functions with keyword-only dimension arguments.

The trainer, evaluator and checkpoint loader only ever call :func:`build_model` with the
name and keyword arguments stored in a checkpoint; they never branch on a model's name.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` buildable as ``build_model(name, **kwargs)``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registry_name = name
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


def model_arguments(name: str) -> dict[str, object]:
    """The constructor's keyword arguments with their defaults (what a config may set)."""
    sig = inspect.signature(model_class(name).__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Unknown keyword arguments are an error, not silently dropped."""
    cls = model_class(name)
    allowed = model_arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"model {name!r} takes no argument(s) {unknown}; it takes {sorted(allowed)}")
    kwargs = {k: tuple(v) if k == "grid" else v for k, v in kwargs.items()}
    model = cls(**kwargs)
    # What rebuilds this model: the checkpoint writer stores it next to the weights.
    model.avel_spec = {"name": name, "kwargs": {**_defaults(allowed), **kwargs}}
    return model


def _defaults(allowed: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in allowed.items() if v is not inspect.Parameter.empty}
