"""Feature-extraction speed: video-seconds extracted per wall-second, per backbone pair.

Encodes its own clips (H.264 + AAC, moving patterns and a tone with noise) into a temporary folder, then
runs the full ``avel.features.extract.extract`` pipeline (decode threads, CNN, h5 store) for each pair:

* ``efficientnet-lite0+logmel``: the offline defaults (shipped ImageNet weights; logmel has no weights);
* ``vgg19-pool5+vggish``: the official AVE pair with RANDOM weights (``weights='random'``): the speed is the
  same as with the real weights, the features are not.

It also reports the visual and audio CNNs' achieved FLOP rate: convolution and linear FLOPs are counted
analytically by forward hooks (2 * Cin * Cout * kh * kw * Hout * Wout / groups per image; 2 * in * out per
row for linear layers) and divided by the time spent inside the backbone calls (preprocessing included);
this is compared with the rate of a float32 2048x2048 matmul measured in the same process (median of 7).
The logmel front end is numpy FFTs, not counted. Decode-only throughput is reported too.

    python benchmarks/extract_speed.py                 # default: 2 clips x 3 s, both pairs (~1-2 min on 2 idle cores)
    python benchmarks/extract_speed.py --clips 8 --seconds 10 --pairs efficientnet-lite0+logmel
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avel.features import audio_backbones, build_audio_backbone, build_visual_backbone, visual_backbones
from avel.features.decode import decode_video
from avel.features.extract import collect_videos, extract
from avel.features.media import write_clip

PAIRS = {
    "efficientnet-lite0+logmel": (("efficientnet-lite0", None), ("logmel", None)),
    "vgg19-pool5+vggish": (("vgg19-pool5", "random"), ("vggish", "random")),
}


def make_clips(folder: Path, n: int, seconds: int, size: tuple[int, int], src_fps: int) -> list[Path]:
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    paths = []
    for c in range(n):
        frames = np.empty((seconds * src_fps, h, w, 3), np.uint8)
        for k in range(len(frames)):
            frames[k, ..., 0] = (x + 3 * k + 17 * c) % 256
            frames[k, ..., 1] = (y + 2 * k) % 256
            frames[k, ..., 2] = ((x + y) // 2 + 5 * k) % 256
            cy, cx = (k * 3) % max(1, h - 32), (k * 5 + 40 * c) % max(1, w - 32)
            frames[k, cy:cy + 32, cx:cx + 32] = rng.integers(0, 256, (min(32, h), min(32, w), 3), dtype=np.uint8)
        t = np.arange(seconds * 16000) / 16000
        audio = 0.2 * np.sin(2 * np.pi * (300 + 100 * c) * t) + 0.02 * rng.standard_normal(len(t))
        paths.append(write_clip(folder / f"clip{c:03d}.mp4", frames, src_fps, audio.astype(np.float32)))
    return paths


class FlopCounter:
    """Forward hooks on Conv2d / Linear layers of the nn.Modules held by a backbone object."""

    def __init__(self, backbone):
        self.flops = 0
        self.handles = []
        modules = [v for v in vars(backbone).values() if isinstance(v, nn.Module)]
        for m in modules:
            for layer in m.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    self.handles.append(layer.register_forward_hook(self._hook))

    def _hook(self, layer, inputs, output):
        if isinstance(layer, nn.Conv2d):
            b, c_out, h, w = output.shape
            kh, kw = layer.kernel_size
            self.flops += 2 * (layer.in_channels // layer.groups) * c_out * kh * kw * h * w * b
        else:
            self.flops += 2 * layer.in_features * layer.out_features * (output.numel() // layer.out_features)

    def close(self):
        for h in self.handles:
            h.remove()


class Timed:
    """A backbone proxy that accumulates the time spent in its calls (other attributes pass through)."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def matmul_rate(n: int = 2048, repeats: int = 7, device: str = "cpu") -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--fps", type=int, default=16, help="frames per second fed to the visual CNN")
    p.add_argument("--src-fps", type=int, default=25, help="frame rate of the encoded clips")
    p.add_argument("--size", default="240x320", help="clip frame size HxW")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, from {list(PAIRS)}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-frames", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    pairs = [s.strip() for s in args.pairs.split(",") if s.strip()]
    for name in pairs:
        if name not in PAIRS:
            p.error(f"unknown pair {name!r}; choose from {list(PAIRS)}")

    cmd = [sys.executable.rsplit("/", 1)[-1], "benchmarks/extract_speed.py", "--clips", str(args.clips),
           "--seconds", str(args.seconds), "--fps", str(args.fps), "--src-fps", str(args.src_fps),
           "--size", f"{h}x{w}", "--pairs", ",".join(pairs), "--workers", str(args.workers),
           "--batch-frames", str(args.batch_frames), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("reproduce:", shlex.join(cmd))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))

    mm = matmul_rate(device=args.device)
    print(f"float32 matmul 2048x2048 (median of 7): {mm / 1e9:.1f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="avel-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        clips = make_clips(tmp / "clips", args.clips, args.seconds, (h, w), args.src_fps)
        print(f"encoded {args.clips} clips of {args.seconds} s at {w}x{h}, {args.src_fps} fps "
              f"in {time.perf_counter() - t:.1f} s")
        video_s = args.clips * args.seconds

        t = time.perf_counter()
        for c in clips:
            decode_video(c, fps=args.fps, seconds=args.seconds, size=(224, 224))
        dt = time.perf_counter() - t
        print(f"decode only (1 thread, frames resized to 224x224): {video_s / dt:.1f} video-s/s")

        items, _ = collect_videos([tmp / "clips"])
        avail_v, avail_a = visual_backbones(), audio_backbones()
        for name in pairs:
            (vname, vweights), (aname, aweights) = PAIRS[name]
            if vname not in avail_v or aname not in avail_a:
                print(f"{name}: skipped (backbone not available)")
                continue
            try:
                visual = Timed(build_visual_backbone(vname, weights=vweights, device=args.device))
                audio = Timed(build_audio_backbone(aname, weights=aweights, device=args.device))
            except Exception as e:  # noqa: BLE001 - weights missing etc.
                print(f"{name}: skipped ({type(e).__name__}: {e})")
                continue
            vflops, aflops = FlopCounter(visual.inner), FlopCounter(audio.inner)
            t = time.perf_counter()
            res = extract(items, tmp / f"out-{vname}", audio_backbone=audio, visual_backbone=visual,
                          seconds=args.seconds, fps=args.fps, batch_frames=args.batch_frames, workers=args.workers,
                          num_shards=1, shard_index=0, progress=False)
            wall = time.perf_counter() - t
            vflops.close()
            aflops.close()
            assert res.failed == 0, res
            note = " (RANDOM weights: timing only)" if "random" in (vweights, aweights) else ""
            print(f"{name}{note}: {video_s / wall:.2f} video-s per wall-s "
                  f"({video_s} video-s in {wall:.1f} s; {args.fps} frames/s -> {video_s * args.fps} frames)")
            for label, bb, fc in (("visual", visual, vflops), ("audio", audio, aflops)):
                if fc.flops == 0:
                    print(f"  {label} {bb.spec.backbone}: {bb.seconds:.2f} s in calls (no conv/linear FLOPs: numpy front end)")
                    continue
                rate = fc.flops / bb.seconds
                print(f"  {label} {bb.spec.backbone}: {fc.flops / 1e9:.1f} GFLOP in {bb.seconds:.2f} s of calls "
                      f"= {rate / 1e9:.1f} GFLOP/s = {rate / mm:.0%} of the matmul rate; "
                      f"{fc.flops / bb.calls / 1e9 if bb.calls else 0:.2f} GFLOP per call; "
                      f"share of wall time {bb.seconds / wall:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
