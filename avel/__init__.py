"""avel: audio-visual event localization (AVE) — data, models, training, features, reports."""
from __future__ import annotations

__version__ = "0.1.0"

from .engine.checkpoint import load  # noqa: E402
from .models import available_models, build_model  # noqa: E402


def __getattr__(name: str):
    # Heavy parts (PyAV, feature backbones) load only when asked for.
    if name == "Localizer":
        from .localize import Localizer

        return Localizer
    raise AttributeError(f"module 'avel' has no attribute {name!r}")


__all__ = ["load", "build_model", "available_models", "Localizer", "__version__"]
