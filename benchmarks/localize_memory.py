"""Peak memory of ``avel localize`` against clip length: it should stay flat (the clip streams through).

Encodes synthetic clips (H.264 + AAC: moving gradients with a little noise, a tone with noise) of each
length into a work folder (kept, so a rerun reuses them), saves a tiny random ``av_att`` checkpoint
with its ModelCard (as tests/test_localize.py does) whose feature spec is the offline backbones
(efficientnet-lite0 at ``--visual-size``, logmel), then runs ``avel localize`` on each clip in a fresh
Python process and reports that process's peak resident memory (``VmHWM``, read by the child itself
at exit: a forked child's ``ru_maxrss`` would start from the parent's size) and its wall time.

Goal: the peak is flat (within ~15%) from 120 s to 600 s; only the per-second features grow (for
efficientnet-lite0 at 64x64: a 2x2x1280 float32 map, 20 KB per second).

    OMP_NUM_THREADS=1 python benchmarks/localize_memory.py                       # 30, 120, 300, 600 s
    OMP_NUM_THREADS=1 python benchmarks/localize_memory.py --lengths 30 120 --visual-size 96
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Bell", "Bird", "Alarm", "background"]


def encode_clip(path: Path, seconds: int, *, fps: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A synthetic clip: moving colour gradients with noise, a tone with noise."""
    from avel.features.media import write_clip

    sys.path.insert(0, str(REPO / "tests"))
    from _support.media import tone

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    n = seconds * fps
    frames = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        t = k / fps
        img = np.stack([np.sin(2 * np.pi * (x + 0.1 * t)), np.cos(2 * np.pi * (y - 0.07 * t)),
                        np.sin(2 * np.pi * (x + y + 0.03 * t))], -1)
        img = 127.5 * (img + 1) + rng.normal(0, 8, img.shape)
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    audio = tone(seconds, 440.0, amplitude=0.2) + rng.normal(0, 0.02, seconds * 16000).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.mp4")
    write_clip(tmp, frames, fps, audio)
    os.replace(tmp, path)
    return path


def save_checkpoint(folder: Path, visual_size: int, fps: int) -> Path:
    """A tiny random av_att checkpoint whose card names the offline backbones (efficientnet-lite0 at
    ``visual_size``, logmel) at ``fps`` frames per second."""
    import dataclasses

    import torch

    from avel import ModelCard, build_model
    from avel.engine import checkpoint
    from avel.features import build_backbones
    from avel.models.registry import complete_arguments, model_class
    from avel.spec import FeatureSpec

    a, v = build_backbones("logmel", "efficientnet-lite0", visual_size=visual_size)
    spec = FeatureSpec(dataclasses.replace(a.spec, fps=1.0),
                       dataclasses.replace(v.spec, fps=1.0, frames_per_segment=int(fps)))
    torch.manual_seed(1)
    kwargs = dict(audio_dim=spec.audio.dim, visual_dim=spec.visual.dim, grid=tuple(spec.visual.grid),
                  num_classes=len(CLASSES), hidden=16, att_hidden=32)
    model = build_model("av_att", **kwargs)
    card = ModelCard(model="av_att", model_kwargs=complete_arguments("av_att", kwargs), task="supervised",
                     class_names=tuple(CLASSES), feature_spec=spec, outputs=model_class("av_att").outputs,
                     training={"segments": 10})
    return checkpoint.save(folder, model, card)


def child(clip: str, ckpt: str, out: str) -> None:
    """Run `avel localize` in this (fresh) process; print one JSON line: peak RSS, seconds, exit code."""
    t0 = time.perf_counter()
    from avel.cli import main

    rc = main(["localize", clip, "--checkpoint", ckpt, "--out", out])
    wall = time.perf_counter() - t0
    peak = None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    print(json.dumps({"rc": rc, "peak_rss_mb": peak, "seconds": wall}))


def run_one(clip: Path, ckpt: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(clip), str(ckpt), str(out)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"localize of {clip} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    if got["rc"] != 0:
        raise RuntimeError(f"avel localize {clip} exited {got['rc']}:\n{p.stderr[-3000:]}")
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[30, 120, 300, 600], help="clip lengths in seconds")
    ap.add_argument("--visual-size", type=int, default=64, help="efficientnet-lite0 input size (64: a 2x2 grid)")
    ap.add_argument("--fps", type=int, default=4, help="frames per second the card's features average")
    ap.add_argument("--frame-size", type=int, default=64, help="frame size of the encoded clips")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "avel-localize-memory",
                    help="where the clips are encoded (kept and reused)")
    ap.add_argument("--child", nargs=3, metavar=("CLIP", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0

    print("# avel localize: peak RSS of a fresh process against clip length")
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]])
    print(f"# reproduce: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} python {command}")
    print(f"# efficientnet-lite0 at {args.visual_size}x{args.visual_size} + logmel, {args.fps} frames/s, "
          f"tiny random av_att; clips {args.frame_size}x{args.frame_size} at 8 fps; load avg {os.getloadavg()}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(work / f"ckpt-{args.visual_size}-{args.fps}", args.visual_size, args.fps)
    rows = []
    for n in args.lengths:
        clip = work / f"clip-{n}s-{args.frame_size}.mp4"
        if not clip.is_file():
            t0 = time.perf_counter()
            encode_clip(clip, n, size=args.frame_size)
            print(f"# encoded {clip.name} ({clip.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        got = run_one(clip, ckpt, work / f"out-{n}")
        rows.append((n, got["peak_rss_mb"], got["seconds"]))
        print(f"# {n} s: {got['peak_rss_mb']:.0f} MB, {got['seconds']:.1f} s", flush=True)
    base = next((r[1] for r in rows if r[0] == 120), rows[0][1])
    print()
    print("| clip length (s) | peak RSS (MB) | vs 120 s | seconds |")
    print("|---|---|---|---|")
    for n, peak, secs in rows:
        print(f"| {n} | {peak:.0f} | {100 * (peak / base - 1):+.1f}% | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
