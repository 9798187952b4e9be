"""VGGish log-mel front end (waveform -> [N, 96, 64] examples) and the weight-free ``logmel`` audio backbone.

The front end reproduces torchvggish's ``vggish_input.waveform_to_examples`` / ``mel_features``
(itself a port of Google's TensorFlow VGGish), in float64 numpy:

* multichannel input ``[samples, channels]`` is averaged to mono; other rates are resampled to 16 kHz
  with :func:`avel.features.resample.resample` (a re-implementation of resampy's ``kaiser_best``);
* STFT: periodic Hann window of 400 samples (25 ms), hop 160 (10 ms), FFT 512, magnitude, no padding;
* 64 triangular HTK-mel bands between 125 and 7500 Hz (DC bin weight forced to 0), ``log(mel + 0.01)``;
* examples of 96 frames (0.96 s) with hop 96; an incomplete last example is dropped.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...spec import StreamSpec
from ..registry import register_audio
from ..resample import resample

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW = 400          # 0.025 s
HOP = 160             # 0.010 s
FFT = 512
NUM_BANDS = 64
MEL_LOW_HZ = 125.0
MEL_HIGH_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96   # 0.96 s
# samples that give exactly one 96-frame example: 400 + 95 * 160
EXAMPLE_SAMPLES = WINDOW + (EXAMPLE_FRAMES - 1) * HOP  # 15600


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def mel_matrix(num_bands: int = NUM_BANDS, num_bins: int = FFT // 2 + 1, sample_rate: int = SAMPLE_RATE,
               low_hz: float = MEL_LOW_HZ, high_hz: float = MEL_HIGH_HZ) -> np.ndarray:
    """[num_bins, num_bands] triangular weights (peak 1, unnormalised), DC bin zeroed."""
    bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_bins))
    edges = np.linspace(hertz_to_mel(low_hz), hertz_to_mel(high_hz), num_bands + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lower[None]) / (center - lower)[None]
    down = (upper[None] - bins_mel[:, None]) / (upper - center)[None]
    m = np.maximum(0.0, np.minimum(up, down))
    m[0, :] = 0.0
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=1)
def _periodic_hann(n: int = WINDOW) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi / n * np.arange(n))
    w.setflags(write=False)
    return w


def to_mono_16k(waveform: np.ndarray, sample_rate: float) -> np.ndarray:
    """float64 mono at 16 kHz. 2-D input is [samples, channels] (the torchvggish convention)."""
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"waveform must be [samples] or [samples, channels], got shape {x.shape}")
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    return x


def log_mel_spectrogram(x: np.ndarray) -> np.ndarray:
    """Mono 16 kHz float64 samples [n] -> log-mel frames [F, 64] (float64); F = 1 + (n - 400) // 160."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] < WINDOW:
        return np.zeros((0, NUM_BANDS))
    frames = sliding_window_view(x, WINDOW)[::HOP]                       # [F, 400]
    spec = np.abs(np.fft.rfft(frames * _periodic_hann(), n=FFT, axis=-1))  # [F, 257]
    return np.log(spec @ mel_matrix() + LOG_OFFSET)                      # [F, 64]


def waveform_to_examples(waveform: np.ndarray, sample_rate: float) -> np.ndarray:
    """Waveform (any rate, mono or [samples, channels]) -> float32 examples [N, 96, 64] at hop 0.96 s."""
    mel = log_mel_spectrogram(to_mono_16k(waveform, sample_rate))  # [F, 64]
    n = mel.shape[0] // EXAMPLE_FRAMES
    return mel[: n * EXAMPLE_FRAMES].reshape(n, EXAMPLE_FRAMES, NUM_BANDS).astype(np.float32)


def segment_examples(waveform: np.ndarray, seconds: int, *, sample_rate: float = SAMPLE_RATE) -> np.ndarray:
    """One 0.96 s example per second: example t is the 96 frames computed from samples
    [t*16000, t*16000 + 15600) (the AVE convention). Short audio is zero-padded. -> float32 [T, 96, 64]."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    x = to_mono_16k(waveform, sample_rate)
    need = max(0, (seconds - 1) * SAMPLE_RATE + EXAMPLE_SAMPLES)
    if x.shape[0] < need:
        log.debug("zero-padding %d samples to %d for %d segments", x.shape[0], need, seconds)
        x = np.pad(x, (0, need - x.shape[0]))
    if seconds == 0:
        return np.zeros((0, EXAMPLE_FRAMES, NUM_BANDS), np.float32)
    starts = np.arange(seconds) * SAMPLE_RATE
    chunks = np.stack([x[s:s + EXAMPLE_SAMPLES] for s in starts])        # [T, 15600]
    frames = sliding_window_view(chunks, WINDOW, axis=1)[:, ::HOP]       # [T, 96, 400]
    spec = np.abs(np.fft.rfft(frames * _periodic_hann(), n=FFT, axis=-1))  # [T, 96, 257]
    return np.log(spec @ mel_matrix() + LOG_OFFSET).astype(np.float32)    # [T, 96, 64]


LOGMEL_SPEC = StreamSpec("logmel", 2 * NUM_BANDS, (), 1.0, 1, SAMPLE_RATE, "none", "vggish-logmel-meanstd")


class LogMelBackbone:
    """Weight-free audio features: per second, the mean and the standard deviation over the 96 frames of
    each of the 64 log-mel bands of that second's VGGish example -> [T, 128] (means first, then stds)."""

    spec = LOGMEL_SPEC

    def __call__(self, waveform: np.ndarray, seconds: int, *, sample_rate: float = SAMPLE_RATE) -> np.ndarray:
        ex = segment_examples(waveform, seconds, sample_rate=sample_rate).astype(np.float64)  # [T, 96, 64]
        return np.concatenate([ex.mean(axis=1), ex.std(axis=1)], axis=1).astype(np.float32)  # [T, 128]


@register_audio("logmel")
def build_logmel(*, weights: str | None = None, device: str = "cpu", **kwargs) -> LogMelBackbone:
    """``weights`` must be None or 'none' (the backbone has no weights); ``device`` is ignored."""
    if weights not in (None, "none"):
        raise ValueError(f"the logmel backbone has no weights; got weights={weights!r}")
    if kwargs:
        raise TypeError(f"unexpected options for the logmel backbone: {sorted(kwargs)}")
    return LogMelBackbone()
