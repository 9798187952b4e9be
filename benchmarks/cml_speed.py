"""Cross-modal localization (A2V / V2A) evaluation of the 402-video test split.

* avel: ``avel.engine.evaluate.evaluate`` with ``avel.tasks.CrossModalTask``: per batch of videos,
  the two branches embed every second once and all 10x10 visual-audio distances come from one
  broadcast; ``avel.metrics.cross_modal_localization`` then scores every window start at once;
* per-pair loop (imitating the original Keras evaluation): for every video, direction, window
  start and event second, one network call on one (visual second, audio second) pair, summed
  per window, argmin. Timed on ``--subset`` videos and extrapolated to the split by its call count.

Random CML weights and AVE-shaped random features (512-d visual vectors, 128-d audio), events
of random partial length; both methods are checked to pick the same windows on the subset.

    python benchmarks/cml_speed.py
    python benchmarks/cml_speed.py --subset 40 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import all_threads, median, print_header, set_threads  # noqa: E402

T, DV, DA = 10, 512, 128


class Rows:
    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def read(self, indices):
        return self.array[np.asarray(indices)]


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    audio = rng.random((n, T, DA), dtype=np.float32)
    visual = rng.random((n, T, DV), dtype=np.float32)
    mask = np.zeros((n, T), np.float32)
    for i in range(n):
        length = int(rng.integers(1, T))                  # partial events only (the evaluated ones)
        start = int(rng.integers(0, T - length + 1))
        mask[i, start:start + length] = 1
    return audio, visual, mask


@torch.inference_mode()
def per_pair(model, audio, visual, mask) -> tuple[dict, int]:
    """The original protocol, one network call per (visual second, audio second) pair."""
    hits = {"a2v": 0, "v2a": 0}
    calls = 0
    for a, v, m in zip(audio, visual, mask):
        seg = np.flatnonzero(m > 0)
        l = len(seg)
        for direction in ("a2v", "v2a"):
            scores = []
            for n in range(T - l + 1):
                total = 0.0
                for i in range(l):
                    vi, ai = (n + i, seg[i]) if direction == "a2v" else (seg[i], n + i)
                    d = model(torch.from_numpy(a[ai:ai + 1]), torch.from_numpy(v[vi:vi + 1]))["distance"]
                    total += float(d)
                    calls += 1
                scores.append(total)
            hits[direction] += int(int(np.argmin(scores)) == seg[0])
    return hits, calls


def pair_calls(mask) -> int:
    lengths = mask.sum(1).astype(int)
    return int(sum(2 * (T - l + 1) * l for l in lengths))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=402)
    p.add_argument("--subset", type=int, default=20, help="videos timed with the per-pair loop")
    p.add_argument("--threads", default="1,all")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    from avel.engine.evaluate import evaluate
    from avel.models import build_model
    from avel.tasks import CrossModalTask, VideoVectors

    print_header(f"cross-modal localization evaluation, {args.videos} videos")
    audio, visual, mask = make_data(args.videos)
    task = CrossModalTask()
    source = VideoVectors(Rows(audio), Rows(visual), mask, np.arange(args.videos))
    torch.manual_seed(0)
    model = build_model("cml", audio_dim=DA, visual_dim=DV).eval()
    print("| threads | avel evaluator, whole split (s) | per-pair loop, whole split (s, extrapolated) | speed-up |")
    print("|---|---|---|---|")
    for th in [all_threads() if t == "all" else int(t) for t in args.threads.split(",")]:
        set_threads(th)
        evaluate(model, task, source, [])
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            metrics, out = evaluate(model, task, source, [])
            times.append(time.perf_counter() - t0)
        fast = median(times)
        # Same windows as the per-pair loop on the subset.
        k = args.subset
        t0 = time.perf_counter()
        hits, calls = per_pair(model, audio[:k], visual[:k], mask[:k])
        slow_sub = time.perf_counter() - t0
        sub = evaluate(model, task, VideoVectors(Rows(audio[:k]), Rows(visual[:k]), mask[:k], np.arange(k)), [])[0]
        for d in ("a2v", "v2a"):
            assert abs(100.0 * hits[d] / k - sub[f"{d}_accuracy"]) < 1e-9, (d, hits[d], sub)
        slow = slow_sub / calls * pair_calls(mask)
        print(f"| {th} | {fast:.3f} | {slow:.1f} ({calls} calls on {k} videos: {1e6 * slow_sub / calls:.0f} us/call; "
              f"{pair_calls(mask)} calls for the split) | {slow / fast:.0f}x |", flush=True)
    print(f"\nA2V {metrics['a2v_accuracy']:.1f}%, V2A {metrics['v2a_accuracy']:.1f}% on random weights "
          f"({metrics['evaluated_videos']} videos evaluated); per-pair loop agrees on the subset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
