"""Raw video -> per-second features: decoding, backbones (registered by name), the extraction job.

Importing this package registers the built-in backbones (:mod:`avel.features.backbones`) in the leaf
registry (:mod:`avel.features.registry`), as ``avel.models`` does for models.
"""
from . import backbones  # noqa: F401  (registration side effects)
from .registry import (
                       BackboneError,
                       audio_backbones,
                       build_audio_backbone,
                       build_backbones,
                       build_visual_backbone,
                       visual_backbones,
)

__all__ = ["BackboneError", "audio_backbones", "build_audio_backbone", "build_backbones", "build_visual_backbone",
           "visual_backbones"]
