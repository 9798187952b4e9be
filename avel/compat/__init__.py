"""Readers for the official AVE release files: PyTorch checkpoints (no pickled code runs) and Keras CML weights."""
from .keras import KerasWeightsError, load_keras_cml
from .limits import Limits, OriginalCheckpointError, UnsafeCheckpointError
from .original import OriginalCheckpoint, ave_class_names, convert_original, kinds, load_original, read_original

__all__ = [
    "KerasWeightsError",
    "Limits",
    "OriginalCheckpoint",
    "OriginalCheckpointError",
    "UnsafeCheckpointError",
    "ave_class_names",
    "convert_original",
    "kinds",
    "load_keras_cml",
    "load_original",
    "read_original",
]
