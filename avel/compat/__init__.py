"""Readers for the official AVE release files: PyTorch checkpoints (no pickled code runs) and Keras CML weights."""
from .keras import KerasWeightsError, load_keras_cml
from .original import (
    OriginalCheckpoint,
    OriginalCheckpointError,
    UnsafeCheckpointError,
    load_original,
    read_original,
)

__all__ = [
    "KerasWeightsError",
    "OriginalCheckpoint",
    "OriginalCheckpointError",
    "UnsafeCheckpointError",
    "load_keras_cml",
    "load_original",
    "read_original",
]
