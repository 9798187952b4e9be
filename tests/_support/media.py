"""Media helpers only the tests use: solid-colour frames, sine tones, audio-only decoding."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from avel.features.decode import DEFAULT_SAMPLE_RATE, DecodedVideo, decode_video


def color_frames(colors: Sequence[Sequence[int]], frames_per_color: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Solid-colour frames: ``frames_per_color`` frames of each RGB colour in turn -> uint8 [N, H, W, 3]."""
    h, w = size
    out = np.empty((len(colors) * frames_per_color, h, w, 3), dtype=np.uint8)
    for i, c in enumerate(colors):
        out[i * frames_per_color:(i + 1) * frames_per_color] = np.asarray(c, dtype=np.uint8)
    return out


def tone(seconds: float, freq: float = 440.0, sample_rate: int = 16000, amplitude: float = 0.3) -> np.ndarray:
    """A sine tone, float32 [seconds * sample_rate]."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode_audio(path: str | Path, *, seconds: int | None = None, sample_rate: int = DEFAULT_SAMPLE_RATE) -> DecodedVideo:
    """Only the waveform of ``path`` (any audio or video file); ``frames`` is an empty array."""
    d = decode_video(path, seconds=seconds, sample_rate=sample_rate, video=False, size=(2, 2))
    d.frames = d.frames[:0]
    return d
