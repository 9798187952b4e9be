"""Tiny backbones for extraction tests (importable by subprocesses: tests/ is put on sys.path).

FakeVisual: average-pools each frame to a 2x2 grid of its 3 colour channels (/255) -> [N, 2, 2, 3].
FakeAudio: per second [RMS, peak |x|] of the waveform -> [T, 2].
Both count their calls; ``fail_on`` makes the n-th call (1-based) raise, to simulate a crash.
"""
from __future__ import annotations

import numpy as np
import torch

from avel.spec import StreamSpec


class BackboneCrash(RuntimeError):
    pass


class FakeVisual:
    def __init__(self, fail_on: int | None = None, input_size=None):
        self.spec = StreamSpec("fake-pool2x2", 3, (2, 2), weights="none", preprocessing="rgb/255")
        self.calls = 0
        self.frames_seen = 0
        self.fail_on = fail_on
        if input_size is not None:
            self.input_size = input_size

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise BackboneCrash(f"simulated crash on call {self.calls}")
        n, h, w, c = frames.shape
        self.frames_seen += n
        x = frames[:, : h // 2 * 2, : w // 2 * 2].astype(np.float32) / 255.0
        x = x.reshape(n, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4))
        return torch.from_numpy(np.ascontiguousarray(x))


class FakeAudio:
    def __init__(self, sample_rate: int = 16000):
        self.spec = StreamSpec("fake-rms", 2, (), sample_rate=sample_rate, weights="none")
        self.calls = 0

    def __call__(self, waveform: np.ndarray, seconds: int) -> np.ndarray:
        self.calls += 1
        sr = self.spec.sample_rate
        w = np.zeros(seconds * sr, np.float32)
        n = min(len(waveform), len(w))
        w[:n] = waveform[:n]
        w = w.reshape(seconds, sr)
        return np.stack([np.sqrt((w ** 2).mean(1)), np.abs(w).max(1)], 1).astype(np.float32)


def run_shard(inputs: list[str], out: str, shard_index: int, num_shards: int) -> None:
    """Entry point for the two-process sharding test."""
    from avel.features.extract import collect_videos, extract

    items, ann = collect_videos(inputs)
    extract(items, out, audio_backbone=FakeAudio(), visual_backbone=FakeVisual(), seconds=3, fps=4,
            workers=1, num_shards=num_shards, shard_index=shard_index, progress=False, annotations=ann)
