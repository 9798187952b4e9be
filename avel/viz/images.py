"""PNG images with Pillow: uint8 arrays in, PNG bytes or files out."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_write


def encode_png(image: np.ndarray, *, level: int = 6) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 1|2|3|4] -> PNG bytes (zlib ``level``)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"PNG writer expects uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image must be [H, W] or [H, W, 1-4] with H, W >= 1, got shape {img.shape}")
    pixels = np.ascontiguousarray(img[:, :, 0] if img.shape[2] == 1 else img)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)   # mode L, LA, RGB or RGBA from the shape
    return buf.getvalue()


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` as a PNG file (atomically); returns ``path``."""
    path = Path(path)
    atomic_write(path, encode_png(image))
    return path
