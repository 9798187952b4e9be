"""AVE-format synthetic data: the release's files and keys, with segments that only the
combination of audio and vision can label.

Every video has one event class c. In each second, an audio "sound" (a class prototype plus noise)
may be on or off, and a visual "object" (a class prototype written into a few grid cells) may be
on or off. A second is the event c only when the sound *and* the object of c are both there;
otherwise it is background, and background seconds are built to fool single modalities:

- off-screen sound: the sound of c, no object (an audio-only model calls it c);
- silent object: the object of c, no sound (a visual-only model calls it c);
- mismatch: the sound of c with the object of another class, or the reverse.

So an audio-only or visual-only model cannot reach the accuracy of a model that checks both, and
the object sits in a random cell of the grid, which is what audio-guided attention is for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import layout
from ..io import atomic_write
from ..layout import h5_writer, write_h5
from ..spec import FeatureSpec, StreamSpec
from .store import write_spec


@dataclass(frozen=True)
class SynthConfig:
    videos: int = 400
    classes: int = 6
    segments: int = 10
    audio_dim: int = 128
    visual_dim: int = 128
    grid: tuple[int, int] = (7, 7)
    background_videos: int = 200     # background-only videos (the weak setting's *_noisy.h5)
    noise: float = 0.6
    seed: int = 0
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self):
        """Refuse what cannot make a folder (before anything is written), naming the field."""
        def whole(name: str, value, least: int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"synthetic data: {name} must be a whole number >= {least}, got {value!r}")

        whole("classes", self.classes, 2)                  # a video's distractors are the other classes
        whole("videos", self.videos, max(1, self.classes))  # the first rows hold one video of every class
        whole("segments", self.segments, 2)
        whole("audio_dim", self.audio_dim, 1)
        whole("visual_dim", self.visual_dim, 1)
        whole("background_videos", self.background_videos, 0)
        if len(self.grid) != 2:
            raise ValueError(f"synthetic data: grid must be (height, width), got {self.grid!r}")
        for side in self.grid:
            whole("grid", side, 1)
        if not (np.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"synthetic data: noise must be a finite number >= 0, got {self.noise!r}")
        if len(self.splits) != 3 or not all(np.isfinite(s) and s >= 0 for s in self.splits) \
                or sum(self.splits) > 1 + 1e-9:
            raise ValueError(f"synthetic data: splits must be three fractions >= 0 summing to at most 1, "
                             f"got {self.splits!r}")


CLASS_NAMES = ["Church bell", "Dog bark", "Violin", "Helicopter", "Train horn", "Chainsaw", "Cat", "Banjo",
               "Motorcycle", "Goat", "Accordion", "Flute", "Clock", "Truck", "Bus", "Horse"]


def class_names(n: int) -> list[str]:
    return [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"Class {i}" for i in range(n)]


def _segment_plan(rng: np.random.Generator, T: int, c: int, classes: int, background_only: bool):
    """Per second: (sound class or -1, object class or -1); and the [start, end) event span."""
    if background_only:
        start = end = 0
    else:
        length = int(rng.integers(2, max(3, T - 1)))
        start = int(rng.integers(0, T - length + 1))
        end = start + length
    sound, obj = np.full(T, -1), np.full(T, -1)
    for t in range(T):
        if start <= t < end:
            sound[t] = obj[t] = c
            continue
        other = int((c + rng.integers(1, classes)) % classes)
        # Mostly seconds that fool one modality; a few empty ones.
        kind = rng.choice(5, p=[0.3, 0.3, 0.15, 0.15, 0.1])
        if kind == 0:
            sound[t] = c                      # off-screen sound
        elif kind == 1:
            obj[t] = c                        # silent object
        elif kind == 2:
            sound[t], obj[t] = c, other       # sound and an unrelated object
        elif kind == 3:
            sound[t], obj[t] = other, c       # object and an unrelated sound
        # kind 4: nothing
    return sound, obj, start, end


def _features(rng, plan, proto_a, proto_v, cfg: SynthConfig):
    sound, obj = plan
    T, (H, W) = cfg.segments, cfg.grid
    audio = np.abs(rng.normal(0, cfg.noise, (T, cfg.audio_dim))).astype(np.float32)
    visual = np.abs(rng.normal(0, cfg.noise, (T, H, W, cfg.visual_dim))).astype(np.float32)
    cell = (int(rng.integers(0, H)), int(rng.integers(0, W)))    # the object stays put in a video
    for t in range(T):
        if sound[t] >= 0:
            audio[t] += proto_a[sound[t]] * rng.uniform(0.7, 1.3)
        if obj[t] >= 0:
            i, j = cell
            visual[t, i, j] += proto_v[obj[t]] * rng.uniform(0.7, 1.3)
    return audio, visual


def generate(out: str | Path, config: SynthConfig = SynthConfig()) -> Path:
    """Write a complete AVE-layout folder to ``out`` and return it."""
    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    names = class_names(cfg.classes)
    C, T, N = cfg.classes + 1, cfg.segments, cfg.videos
    proto_a = np.abs(rng.normal(0, 1.5, (cfg.classes, cfg.audio_dim))).astype(np.float32)
    proto_v = np.abs(rng.normal(0, 1.5, (cfg.classes, cfg.visual_dim))).astype(np.float32)

    # Every class appears in the first rows so first-appearance order equals class order.
    video_class = np.concatenate([np.arange(cfg.classes), rng.integers(0, cfg.classes, N - cfg.classes)])
    lines, labels, closs = [], np.zeros((N, T, C), np.float32), np.zeros((N, T), np.float32)
    paths = [out / name for name in layout.FEATURE_FILES]
    shapes = [(N, T, cfg.audio_dim), (N, T, *cfg.grid, cfg.visual_dim), (N, T, cfg.visual_dim)]
    with h5_writer(paths, shapes, row_chunks=False) as (da, dv, dvec):
        for i, c in enumerate(video_class):
            sound, obj, start, end = _segment_plan(rng, T, int(c), cfg.classes, False)
            audio, visual = _features(rng, (sound, obj), proto_a, proto_v, cfg)
            da[i], dv[i], dvec[i] = audio, visual, layout.grid_mean(visual)
            lines.append(f"{names[c]}&synth{i:05d}&good&{start}&{end}")
            labels[i, :, cfg.classes] = 1
            labels[i, start:end] = 0
            labels[i, start:end, c] = 1
            closs[i, start:end] = 1
    atomic_write(out / layout.ANNOTATIONS, "\n".join(lines) + "\n")
    atomic_write(out / layout.CATEGORIES, "\n".join(names) + "\n")
    write_h5(out / layout.LABELS, labels)
    mil = np.zeros((N, C), np.float32)
    mil[np.arange(N), video_class] = 1
    write_h5(out / layout.MIL_LABELS, mil)
    write_h5(out / layout.CLOSS_LABELS, closs)

    perm = rng.permutation(N)
    n_train, n_val = int(cfg.splits[0] * N), int(cfg.splits[1] * N)
    parts = {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
             "test": np.sort(perm[n_train + n_val:])}
    for split, rows in parts.items():
        write_h5(out / layout.order_file(split), rows.astype(np.int64), key=layout.ORDER_KEY)
        write_h5(out / layout.order_file(split, match=True), rows.astype(np.int64), key=layout.ORDER_KEY)
        atomic_write(out / layout.split_list(split), "".join(lines[r] + "\n" for r in rows))

    # Background-only videos for the weak setting: no second has both the sound and the object.
    B = cfg.background_videos
    if B:
        bg_audio = np.zeros((B, T, cfg.audio_dim), np.float32)
        bg_visual = np.zeros((B, T, *cfg.grid, cfg.visual_dim), np.float32)
        for b in range(B):
            c = int(rng.integers(0, cfg.classes))
            sound, obj, _, _ = _segment_plan(rng, T, c, cfg.classes, True)
            bg_audio[b], bg_visual[b] = _features(rng, (sound, obj), proto_a, proto_v, cfg)
        bg_labels = np.zeros((B, C), np.float32)
        bg_labels[:, cfg.classes] = 1
        write_h5(out / layout.noisy(layout.AUDIO_FEATURES), bg_audio)
        write_h5(out / layout.noisy(layout.VISUAL_FEATURES), bg_visual)
        write_h5(out / layout.noisy(layout.LABELS), bg_labels)

    spec = FeatureSpec(
        audio=StreamSpec("synthetic", cfg.audio_dim, (), 1.0, 1, 0, "none", "synthetic"),
        visual=StreamSpec("synthetic", cfg.visual_dim, tuple(cfg.grid), 1.0, 1, 0, "none", "synthetic"),
    )
    write_spec(out, spec, rows=N, synth=json.loads(json.dumps(cfg.__dict__, default=list)))
    return out

