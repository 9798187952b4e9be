"""Registered models. Importing this package registers every built-in model (the registry is a leaf)."""
from . import av_att, avsdn, baselines, cmbs, cml, cmran, cpsp, dmrn, psp  # noqa: F401  (registration side effects)
from .registry import available_models, build_model, complete_arguments, model_arguments, model_class, register_model

__all__ = ["available_models", "build_model", "complete_arguments", "model_arguments", "model_class",
           "register_model"]
