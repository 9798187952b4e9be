"""Test-split evaluation time (402 AVE videos) and per-video localization latency from features.

* evaluation: ``avel.engine.evaluate.evaluate`` (the trainer's validation and ``avel evaluate``:
  batches of 256, forward, softmax, every metric of ``metrics.summarize``) over 402 AVE-shaped
  videos, with the features (a) already in memory and (b) in the packed float16 layout on disk
  (a 402-row folder written once under ``--workdir``);
* latency: ``avel.Localizer.localize((audio, visual))`` on one 10-second video (batch of 1): forward,
  probabilities, labels and merged event spans.

Times are wall-clock medians over ``--repeats``; the forward FLOP rate is given as a fraction of a
float32 matmul rate measured in the same process (see ``benchmarks/common.py``).

    python benchmarks/evaluate_speed.py
    python benchmarks/evaluate_speed.py --threads 1 --repeats 9
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulRate, all_threads, median, model_flops, print_header, set_threads, table  # noqa: E402

T, GRID, DV, DA, C = 10, (7, 7), 512, 128, 29


class MemoryRows:
    """A row source over arrays already in memory (float32)."""

    def __init__(self, audio, visual, target):
        self.audio, self.visual, self.target = audio, visual, target

    def __len__(self):
        return len(self.audio)

    def read(self, indices):
        i = np.asarray(indices)
        return {"audio": self.audio[i], "visual": self.visual[i], "target": self.target[i],
                "video_label": self.target[i].max(1), "index": i}


def make_arrays(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    audio = rng.random((n, T, DA), dtype=np.float32)
    visual = rng.random((n, T, *GRID, DV), dtype=np.float32)
    classes = rng.integers(0, C, (n, T))
    target = np.eye(C, dtype=np.float32)[classes]
    return audio, visual, target


def packed_source(workdir: Path, audio, visual, target):
    """The same rows in the packed float16 layout (written once)."""
    import h5py

    from avel.data.datasets import SegmentRows
    from avel.data.store import open_store, pack

    root = workdir / f"eval-{len(audio)}"
    if not (root / "packed" / "packed.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for name, arr in (("audio_feature.h5", audio), ("visual_feature.h5", visual)):
            with h5py.File(root / name, "w") as f:
                f.create_dataset("avadataset", data=arr)
        pack(root)
        for name in ("audio_feature.h5", "visual_feature.h5"):      # only the packed copy is needed
            (root / name).unlink()
    store = open_store(root, layout="packed")
    return SegmentRows(store, target, target.max(1), np.arange(len(audio)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="av_att,dmrn")
    p.add_argument("--videos", type=int, default=402, help="test split size (AVE: 402)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch (the evaluator's default)")
    p.add_argument("--threads", default="1,all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-calls", type=int, default=30)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/avel-eval"))
    args = p.parse_args(argv)
    from avel import Localizer, ModelCard
    from avel.engine.evaluate import evaluate
    from avel.models import build_model
    from avel.models.registry import complete_arguments, model_class
    from avel.tasks import SupervisedTask

    print_header(f"evaluation of {args.videos} videos and localization latency (batch of 1)")
    audio, visual, target = make_arrays(args.videos)
    sources = {"in memory": MemoryRows(audio, visual, target),
               "packed float16": packed_source(args.workdir, audio, visual, target)}
    names = [f"class {i}" for i in range(C - 1)] + ["background"]
    task = SupervisedTask()
    rows = []
    for th in [all_threads() if t == "all" else int(t) for t in args.threads.split(",")]:
        set_threads(th)
        ref = MatmulRate()
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = build_model(name, num_classes=C).eval()
            fwd = model_flops(name, videos=args.videos).forward
            for label, src in sources.items():
                evaluate(model, task, src, names, batch_size=args.batch_size)          # warm-up
                times, fracs = [], []
                for _ in range(args.repeats):
                    mm = ref.sample()
                    t0 = time.perf_counter()
                    metrics, _ = evaluate(model, task, src, names, batch_size=args.batch_size)
                    dt = time.perf_counter() - t0
                    times.append(dt)
                    fracs.append(fwd / dt / mm)
                rows.append({"model": name, "threads": th, "what": f"evaluate {args.videos} videos, {label}",
                             "time": median(times), "unit": "s", "frac": 100 * median(fracs)})
                print(f"{name:7s} threads={th}  evaluate {args.videos} videos ({label}): {median(times):.3f} s "
                      f"({100 * median(fracs):.0f}% of matmul rate)", flush=True)
            card = ModelCard(model=name, model_kwargs=complete_arguments(name, {"num_classes": C}),
                             class_names=tuple(names), outputs=model_class(name).outputs)
            loc = Localizer(model, card)
            loc.localize((audio[0], visual[0]))
            lat = []
            for i in range(args.latency_calls):
                j = i % len(audio)
                t0 = time.perf_counter()
                loc.localize((audio[j], visual[j]))
                lat.append(time.perf_counter() - t0)
            rows.append({"model": name, "threads": th, "what": "localize one 10-s video from features",
                         "time": 1e3 * median(lat), "unit": "ms"})
            print(f"{name:7s} threads={th}  localize one 10-s video from features: {1e3 * median(lat):.1f} ms", flush=True)
    print()
    for r in rows:
        r["t"] = f"{r['time']:.3f} s" if r["unit"] == "s" else f"{r['time']:.1f} ms"
    print(table(rows, [("model", "model", "s"), ("threads", "threads", "d"), ("what", "measurement", "s"),
                       ("t", "median time", "s"), ("frac", "% of matmul (forward FLOPs)", ".0f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
