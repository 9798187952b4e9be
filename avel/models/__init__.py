"""Registered models. Importing this package registers every built-in model."""
from . import av_att, baselines, cml, dmrn  # noqa: F401  (registration side effects)
from .registry import available_models, build_model, model_arguments, register_model

__all__ = ["available_models", "build_model", "model_arguments", "register_model"]
