"""Audio-guided attention drawn over the frames.

For each second the attention map [H, W] (a softmax over the grid cells) is rescaled to [0, 1] by
its own minimum and maximum, upsampled bilinearly to the frame size, coloured with :func:`colormap` and blended over the
middle frame of that second. ``avel visualize`` writes one PNG per second (:mod:`avel.viz.images`),
a grid of all seconds, and optionally an mp4 where every frame of a second carries that second's overlay.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..features.decode import decode_video
from ..features.media import write_clip

# Anchors of a perceptually ordered dark-blue -> cyan -> yellow -> red map (roughly "turbo").
_ANCHORS = np.array([
    [0.00, 48, 18, 59],
    [0.15, 65, 105, 225],
    [0.35, 30, 200, 220],
    [0.55, 120, 240, 90],
    [0.75, 250, 200, 40],
    [0.90, 240, 90, 20],
    [1.00, 170, 20, 5],
], dtype=np.float64)

MAX_SIDE = 320       # frames larger than this are scaled down for the grid and the report


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + [3]) by piecewise-linear interpolation."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    out = np.empty(v.shape + (3,), np.float64)
    for ch in range(3):
        out[..., ch] = np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, ch + 1])
    return np.round(out).astype(np.uint8)


def upsample(att: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] map -> [H, W] by bilinear interpolation (cell centres aligned, as the grid covers the frame)."""
    t = torch.as_tensor(np.asarray(att, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(frame: np.ndarray, att: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """Blend the coloured heat map of ``att`` [h, w] over ``frame`` uint8 [H, W, 3].

    The map is rescaled to [0, 1] by its own minimum and maximum (a softmax over a few cells is flat
    in absolute terms); the blend weight grows with the value, so cold cells leave the frame visible."""
    frame = np.asarray(frame, dtype=np.uint8)
    heat = np.clip(upsample(normalize(att), frame.shape[:2]), 0.0, 1.0)
    return _blend(frame, heat, alpha)


def normalize(att: np.ndarray) -> np.ndarray:
    """Rescale one attention map to [0, 1] (min -> 0, max -> 1; a constant map -> zeros)."""
    a = np.asarray(att, dtype=np.float64)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _blend(frame: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    w = alpha * (0.1 + 0.9 * heat)[..., None]
    return np.round(frame * (1 - w) + colormap(heat) * w).astype(np.uint8)


def fit(frame: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    h, w = frame.shape[:2]
    if max(h, w) <= max_side:
        return frame
    s = max_side / max(h, w)
    t = torch.as_tensor(frame).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False,
                      antialias=True)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def middle_frames(path: str | Path, seconds: int, *, max_side: int = MAX_SIDE) -> np.ndarray:
    """The middle frame of each of the first ``seconds`` seconds (time ``s + 0.5``) -> uint8 [T, H, W, 3],
    scaled down so the longer side is at most ``max_side``."""
    d = decode_video(path, fps=1, seconds=int(seconds), audio=False)
    return np.stack([fit(f, max_side) for f in d.frames])


def class_colour(index: int, background: int) -> tuple[int, int, int]:
    """The colour of a class in the grid bars and the report (background grey)."""
    if index == background:
        return (200, 200, 200)
    return PALETTE[index % len(PALETTE)]


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def overlays(frames: np.ndarray, attention: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """Per second: the overlay of attention[t] on frames[t] -> uint8 [T, H, W, 3]."""
    if len(frames) != len(attention):
        raise ValueError(f"{len(frames)} frames but {len(attention)} attention maps")
    return np.stack([overlay(f, a, alpha=alpha) for f, a in zip(frames, attention)])


def grid_image(images: np.ndarray, *, classes: Sequence[int] | None = None, background: int = -1,
               cols: int = 5, gap: int = 4, bar: int = 6) -> np.ndarray:
    """Tile [T, H, W, 3] images row by row (``cols`` per row) on white; under each tile a bar in the
    colour of its predicted class (when ``classes`` is given)."""
    T, H, W, _ = images.shape
    cols = max(1, min(cols, T))
    rows = (T + cols - 1) // cols
    bar_h = bar if classes is not None else 0
    cell_h = H + bar_h
    out = np.full((rows * cell_h + (rows + 1) * gap, cols * W + (cols + 1) * gap, 3), 255, np.uint8)
    for t in range(T):
        r, c = divmod(t, cols)
        y, x = gap + r * (cell_h + gap), gap + c * (W + gap)
        out[y:y + H, x:x + W] = images[t]
        if classes is not None:
            out[y + H:y + H + bar_h, x:x + W] = class_colour(int(classes[t]), background)
    return out


def write_overlay_video(path: str | Path, video: str | Path, attention: np.ndarray, *, fps: int = 16,
                        alpha: float = 0.6, max_side: int = MAX_SIDE) -> Path:
    """An mp4 (H.264 + AAC) of ``video`` with each second's attention overlay on all its frames."""
    T = len(attention)
    d = decode_video(video, fps=fps, seconds=T)
    frames = np.stack([fit(f, max_side) for f in d.frames])
    h, w = frames.shape[1:3]
    heat = [np.clip(upsample(normalize(a), (h, w)), 0, 1) for a in attention]
    out = np.empty_like(frames)
    for i, f in enumerate(frames):
        out[i] = _blend(f, heat[min(i // fps, T - 1)], alpha)
    audio = None if d.flags.get("no_audio") else d.waveform
    return write_clip(path, out, fps, audio, d.sample_rate)
