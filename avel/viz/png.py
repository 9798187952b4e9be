"""Minimal PNG writer and reader (zlib + struct, no imaging library).

The writer makes 8-bit grey, grey+alpha, RGB or RGBA images; every row uses the "Sub" filter
(cheap, and it compresses smooth images well). The reader handles what browsers and encoders commonly write:
8/16-bit grey, grey+alpha, RGB, RGBA and palette images, all five row filters, no interlacing.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}          # channels -> PNG colour type
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}       # PNG colour type -> samples per pixel


class PNGError(ValueError):
    pass


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, *, level: int = 6) -> bytes:
    """uint8 [H, W] (grey), [H, W, 1|2|3|4] -> PNG bytes."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"PNG writer expects uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in _COLOR_TYPES or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image must be [H, W] or [H, W, 1-4] with H, W >= 1, got shape {img.shape}")
    h, w, c = img.shape
    rows = np.ascontiguousarray(img).reshape(h, w * c)
    # "Sub" filter (type 1): each byte minus the byte one pixel to the left (mod 256).
    sub = rows.copy()
    sub[:, c:] = rows[:, c:] - rows[:, :-c]
    raw = np.concatenate([np.ones((h, 1), np.uint8), sub], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPES[c], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def _unfilter(raw: bytes, h: int, w: int, bpp: int) -> np.ndarray:
    """Undo the per-row filters. Pixel (y, x) depends on its left, upper and upper-left neighbours,
    so the pixels of one anti-diagonal (x + y = d) are independent: decode diagonal by diagonal,
    vectorised, choosing each pixel's predictor by its row's filter type."""
    stride = w * bpp
    data = np.frombuffer(raw, np.uint8)
    if data.size < h * (stride + 1):
        raise PNGError(f"image data too short: {data.size} bytes for {h} rows of {stride}")
    data = data[: h * (stride + 1)].reshape(h, stride + 1)
    ftype = data[:, 0].astype(np.int64)
    if ftype.max(initial=0) > 4:
        raise PNGError(f"unknown row filter type {int(ftype.max())}")
    line = data[:, 1:].reshape(h, w, bpp).astype(np.int16)
    if np.all(ftype == 0):
        return line.astype(np.uint8)
    out = np.zeros((h + 1, w + 1, bpp), np.int16)     # one row/column of zeros above and left
    for d in range(h + w - 1):
        ys = np.arange(max(0, d - w + 1), min(h, d + 1))
        xs = d - ys
        a = out[ys + 1, xs]        # left
        b = out[ys, xs + 1]        # up
        c = out[ys, xs]            # up-left
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        f = ftype[ys][:, None]
        pred = np.select([f == 1, f == 2, f == 3, f == 4], [a, b, (a + b) // 2, paeth], 0)
        out[ys + 1, xs + 1] = (line[ys, xs] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C] (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; palettes expand to RGB/RGBA).
    16-bit samples keep their high byte."""
    if data[:8] != SIGNATURE:
        raise PNGError("not a PNG file (bad signature)")
    pos, idat, header, palette, trns = 8, [], None, None, None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            trns = np.frombuffer(body, np.uint8)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise PNGError("no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = header
    if interlace:
        raise PNGError("interlaced PNG is not supported")
    if ctype not in _CHANNELS or depth not in (8, 16) and not (ctype == 3 and depth == 8):
        raise PNGError(f"unsupported PNG: colour type {ctype}, bit depth {depth}")
    channels = _CHANNELS[ctype]
    bpp = channels * depth // 8
    raw = zlib.decompress(b"".join(idat))
    px = _unfilter(raw, h, w, bpp)                     # [h, w, bpp]
    if depth == 16:
        px = px.reshape(h, w, channels, 2)[:, :, :, 0]
    img = px.reshape(h, w, channels)
    if ctype == 3:
        if palette is None:
            raise PNGError("palette image without PLTE chunk")
        rgb = palette[img[:, :, 0]]
        if trns is not None:
            alpha = np.full(len(palette), 255, np.uint8)
            alpha[: len(trns)] = trns
            rgb = np.concatenate([rgb, alpha[img[:, :, 0]][:, :, None]], axis=2)
        img = rgb
    return img


def read_png(path: str | Path) -> np.ndarray:
    return decode_png(Path(path).read_bytes())
