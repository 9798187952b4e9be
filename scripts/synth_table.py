"""Train every model (and the weak and cross-modal tasks) on `avel data synth` data and print a
markdown table of test results, mean ± std over seeds, with the rates a trivial rule gets.

    python scripts/synth_table.py --videos 400 --epochs 30 --seeds 1,2 --out /tmp/avel-synth-table
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from avel.config import recipe
from avel.data.datasets import AVEData
from avel.data.synth import SynthConfig, generate
from avel.engine.train import train_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--models", default="audio,visual,visual_att,av,av_att,dmrn")
    ap.add_argument("--recipe", default="modern")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/avel-synth-table"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    root = generate(args.out / "data", SynthConfig(videos=args.videos))
    data = AVEData.open(root)
    test = data.split("test")
    target = data.targets[test].argmax(-1)
    majority = float((target == np.bincount(target.ravel()).argmax()).mean())
    print(f"synthetic data: {args.videos} videos, test {len(test)}; majority-class segment rate {majority:.3f}")
    print(f"| task | model | recipe | epochs | val | test (mean ± std over seeds {seeds}) | s/run |")
    print("|---|---|---|---|---|---|---|")
    runs = [("supervised", m, args.recipe) for m in args.models.split(",")]
    other = "original" if args.recipe == "modern" else "modern"
    runs += [("supervised", "av_att", other), ("weak", "av_att", args.recipe), ("weak", "av_att", other),
             ("cml", "cml", args.recipe)]
    for task, model, rec in runs:
        base = recipe(rec, task)
        epochs = args.epochs if task != "cml" else max(5, args.epochs // 3)
        cfg = replace(base, model=model, epochs=epochs, eval_every=1, data=replace(base.data, root=str(root)))
        t0 = time.perf_counter()
        summary = train_seeds(cfg, args.out / f"{task}-{model}-{rec}", seeds, progress=False)
        key = "mean_accuracy" if task == "cml" else "accuracy"
        m, s = summary["mean"], summary["std"]
        extra = ""
        if task == "cml":
            extra = (f" (A2V {m['test']['a2v_accuracy']:.1f}, V2A {m['test']['v2a_accuracy']:.1f}; "
                     f"chance {m['test']['chance_accuracy']:.1f})")
        if task == "weak":
            extra = f" (video acc {m['test']['video_accuracy']:.3f})"
        print(f"| {task} | {model} | {rec} | {epochs} | {m['val'][key]:.3f} | "
              f"{m['test'][key]:.3f} ± {s['test'][key]:.3f}{extra} | {(time.perf_counter() - t0) / len(seeds):.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
