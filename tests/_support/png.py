"""Reading PNG files back in tests (Pillow): what avel writes, and what a browser screenshot gives."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C] (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; palettes expand to RGB/RGBA)."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.mode else "RGB")
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_png(path: str | Path) -> np.ndarray:
    return decode_png(Path(path).read_bytes())
