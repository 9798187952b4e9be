"""avel: audio-visual event localization (AVE) — data, models, training, features, reports.

The public API is small: ``avel.load(path)`` returns ``(model, card)`` (the model rebuilt from the card
stored beside its weights), ``avel.build_model`` / ``avel.available_models`` for the registry, and
``avel.Localizer`` for videos.
"""
from __future__ import annotations

from ._version import __version__
from .card import ModelCard
from .engine.checkpoint import load
from .models import available_models, build_model


def __getattr__(name: str):
    # Heavy parts (PyAV, feature backbones) load only when asked for.
    if name == "Localizer":
        from .inference import Localizer

        return Localizer
    raise AttributeError(f"module 'avel' has no attribute {name!r}")


__all__ = ["load", "build_model", "available_models", "Localizer", "ModelCard", "__version__"]
