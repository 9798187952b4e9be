"""Time to accuracy: the ``original`` (2018) recipe for its 20-epoch budget against the recommended
(``modern``) recipe at several budgets, on ``avel data synth`` data of two sizes, 3 seeds each.

What a user feels is how long it takes to get a good model, so every run is the whole of
``avel.engine.train.train`` (training, validation every ``eval_every`` epochs, checkpoint writes) at
one torch thread, timed by the wall clock, and scored by the test segment accuracy of its
best-on-validation checkpoint (selection never sees the test split). Sizes:

* ``small``: 360 training videos, 80 val, 80 test (a small study: 6 steps of 64 per epoch);
* ``large``: 2,400 training videos, 300 val, 300 test (about the AVE release's 3,339 / 402 / 402).

Timings on a shared machine are noisy, so beside each run's wall time the script measures the
float32 2048^3 matmul rate of this process right before and after it (``common.MatmulRate``, one
thread): a slower machine shows as a lower rate, and ``work`` = wall seconds x that rate, in
seconds at the rate of the first sample, is the time at a steady machine speed; the process's CPU time
(which neighbours cannot inflate, only slow) is printed too. The ratio the issue asks for, the time at
which ``modern`` first matches ``original``'s 20-epoch test accuracy (mean of the seeds) over
``original``'s time, is printed in all three units.

    python benchmarks/time_to_accuracy.py                          # both sizes, budgets 1,2,6,20 (about 25 min)
    python benchmarks/time_to_accuracy.py --sizes small --budgets 1,2,3,6,20
    python benchmarks/time_to_accuracy.py --plot /tmp/tta.png --workdir /tmp/avel-tta
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MatmulRate, print_header, table  # noqa: E402

from avel.config import recipe  # noqa: E402
from avel.data.datasets import AVEData  # noqa: E402
from avel.data.synth import SynthConfig, generate  # noqa: E402
from avel.engine import checkpoint  # noqa: E402
from avel.engine.evaluate import evaluate  # noqa: E402
from avel.engine.train import train  # noqa: E402
from avel.layout import SPEC_FILE  # noqa: E402
from avel.tasks import build_task  # noqa: E402

SIZES = {"small": (360, 80, 80), "large": (2400, 300, 300)}     # train / val / test videos
ORIGINAL_EPOCHS = 20


# --- data -------------------------------------------------------------------------------------------

def synth_folder(workdir: Path, size: str) -> Path:
    """The synthetic AVE folder of ``size`` (written once, reused; ``avel data synth`` defaults otherwise)."""
    n_train, n_val, n_test = SIZES[size]
    videos = n_train + n_val + n_test
    root = workdir / f"synth-{size}"
    if not (root / SPEC_FILE).is_file():
        if root.exists():
            shutil.rmtree(root)
        eps = 0.1 / videos                            # int(fraction * videos) must land on the counts
        generate(root, SynthConfig(videos=videos, splits=(n_train / videos + eps, n_val / videos + eps,
                                                          n_test / videos - 2 * eps)))   # test: the rest
    data = AVEData.open(root)
    got = tuple(len(data.split(s)) for s in ("train", "val", "test"))
    if got != SIZES[size]:
        raise RuntimeError(f"{root}: splits {got}, expected {SIZES[size]} (delete the folder)")
    return root


def majority_rate(root: Path, split: str = "test") -> float:
    data = AVEData.open(root)
    labels = data.targets[data.split(split)].argmax(-1)
    return float(np.bincount(labels.ravel()).max() / labels.size)


# --- one run ----------------------------------------------------------------------------------------

def one_run(recipe_name: str, epochs: int, seed: int, root: Path, out: Path, rate: MatmulRate) -> dict:
    config = recipe(recipe_name, "supervised")
    config = replace(config, epochs=epochs, seed=seed, threads=1, data=replace(config.data, root=str(root)))
    before = rate.sample()
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(config, out, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = rate.sample()
    model, _ = checkpoint.load(out)
    data, task = AVEData.open(root), build_task(config)
    test = evaluate(model, task, task.eval_source(data, "test"), data.class_names)[0]["accuracy"]
    shutil.rmtree(out)
    return {"recipe": recipe_name, "epochs": epochs, "seed": seed, "wall_s": wall, "cpu_s": cpu,
            "matmul_gflops": statistics.median([before, after]) / 1e9, "val": result.best_score,
            "best_epoch": result.best_epoch, "test": float(test)}


def summarize(runs: list[dict], reference_gflops: float) -> dict:
    def mean(key):
        return float(np.mean([r[key] for r in runs]))

    tests = np.array([r["test"] for r in runs])
    return {"recipe": runs[0]["recipe"], "epochs": runs[0]["epochs"], "seeds": len(runs),
            "wall_s": mean("wall_s"), "cpu_s": mean("cpu_s"), "matmul_gflops": mean("matmul_gflops"),
            # wall seconds x this run's matmul rate / the reference rate: the time at the reference speed
            "work_s": float(np.mean([r["wall_s"] * r["matmul_gflops"] / reference_gflops for r in runs])),
            "val": mean("val"), "test": float(tests.mean()),
            "test_std": float(tests.std(ddof=1)) if len(tests) > 1 else 0.0}


def first_match(original: dict, modern: list[dict]) -> dict | None:
    """The cheapest modern budget whose mean test accuracy reaches the original's."""
    hits = [m for m in sorted(modern, key=lambda m: m["epochs"]) if m["test"] >= original["test"]]
    return hits[0] if hits else None


# --- the plot (Pillow only: a line plot with axes, ticks and labels) -------------------------------

def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / n
    mag = 10 ** np.floor(np.log10(raw))
    step = min((s * mag for s in (1, 2, 5, 10) if s * mag >= raw), default=raw)
    start = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(start, hi + step * 1e-6, step)]


def line_plot(path: Path, panels: list[dict], *, xlabel: str, ylabel: str, title: str) -> Path:
    """Panels side by side; each: {"title", "series": [{"label", "color", "x", "y", "err", "notes", "dashed"}]}."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pw, ph, left, right, top, bottom = 520, 400, 70, 20, 70, 60
    img = Image.new("RGB", (pw * len(panels), ph + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=font)
    for k, panel in enumerate(panels):
        ox = k * pw
        x0, x1, y0, y1 = ox + left, ox + pw - right, 30 + top, 30 + ph - bottom
        xs = [v for s in panel["series"] for v in s["x"]]
        ys = [v + e * sgn for s in panel["series"] for v, e in zip(s["y"], s.get("err") or [0] * len(s["y"]))
              for sgn in (-1, 1)]
        xmax = max(xs) * 1.08
        ylo, yhi = min(ys), max(ys)
        pad = max(0.02, (yhi - ylo) * 0.08)
        ylo, yhi = max(0.0, ylo - pad), min(1.0, yhi + pad)

        def px(x, x0=x0, x1=x1, xmax=xmax):
            return x0 + (x1 - x0) * x / xmax

        def py(y, y0=y0, y1=y1, ylo=ylo, yhi=yhi):
            return y1 - (y1 - y0) * (y - ylo) / (yhi - ylo)

        d.text((x0, y0 - 50), panel["title"], fill="black", font=font)
        for t in _nice_ticks(0, xmax):
            if t <= xmax:
                d.line([(px(t), y1), (px(t), y1 + 4)], fill="black")
                d.line([(px(t), y0), (px(t), y1)], fill=(235, 235, 235))
                d.text((px(t) - 10, y1 + 7), f"{t:g}", fill="black", font=font)
        for t in _nice_ticks(ylo, yhi):
            if ylo <= t <= yhi:
                d.line([(x0 - 4, py(t)), (x0, py(t))], fill="black")
                d.line([(x0, py(t)), (x1, py(t))], fill=(235, 235, 235))
                d.text((x0 - 40, py(t) - 6), f"{t:.2f}", fill="black", font=font)
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text(((x0 + x1) / 2 - 3 * len(xlabel), y1 + 26), xlabel, fill="black", font=font)
        label = Image.new("RGB", (8 * len(ylabel), 14), "white")
        ImageDraw.Draw(label).text((0, 0), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (ox + 8, int((y0 + y1) / 2 - label.size[1] / 2)))
        for j, s in enumerate(panel["series"]):
            pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"])]
            if s.get("dashed"):
                y = pts[0][1]
                for a in np.arange(x0, x1, 12):
                    d.line([(a, y), (min(a + 6, x1), y)], fill=s["color"], width=1)
            if len(pts) > 1:
                d.line(pts, fill=s["color"], width=2)
            for i, (x, y) in enumerate(pts):
                if s.get("err"):
                    e = s["err"][i]
                    d.line([(x, py(s["y"][i] - e)), (x, py(s["y"][i] + e))], fill=s["color"])
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=s["color"])
                if s.get("notes"):
                    d.text((x + 6, y + 4), s["notes"][i], fill=s["color"], font=font)
            ly = y0 - 16 * (len(panel["series"]) - j) - 4        # the legend, above the axes
            d.line([(x1 - 150, ly + 6), (x1 - 130, ly + 6)], fill=s["color"], width=2)
            d.text((x1 - 125, ly), s["label"], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# --- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="small,large", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--budgets", default="1,2,6,20", help="epochs of the modern recipe, comma list")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/avel-tta"), help="synthetic data and run folders")
    ap.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "time_to_accuracy.png")
    ap.add_argument("--json", type=Path, default=None, help="also write every run as JSON here")
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    budgets = sorted(int(b) for b in args.budgets.split(",") if b)
    seeds = [int(s) for s in args.seeds.split(",") if s]

    torch.set_num_threads(1)
    print_header("time to accuracy: original (20 epochs) vs modern (several budgets), A+V-att, synthetic AVE data")
    print(f"# one torch thread per run; wall = the whole train() call (training + validation + checkpoints);"
          f" test = segment accuracy of the best-on-val checkpoint; seeds {seeds}", flush=True)
    rate = MatmulRate()
    args.workdir.mkdir(parents=True, exist_ok=True)
    everything, measured = [], []
    for size in sizes:
        root = synth_folder(args.workdir, size)
        majority = majority_rate(root)
        n_train, n_val, n_test = SIZES[size]
        print(f"\n## {size}: {n_train} train / {n_val} val / {n_test} test videos ({root}); "
              f"test majority-class rate {majority:.3f}", flush=True)
        plan = [("original", ORIGINAL_EPOCHS)] + [("modern", b) for b in budgets]
        groups = []
        for name, epochs in plan:
            runs = []
            for seed in seeds:
                r = one_run(name, epochs, seed, root, args.workdir / "runs" / f"{size}-{name}-{epochs}-{seed}", rate)
                print(f"  {size} {name:8s} {epochs:3d} ep seed {seed}: wall {r['wall_s']:7.1f} s, cpu {r['cpu_s']:7.1f} s,"
                      f" matmul {r['matmul_gflops']:5.1f} GFLOP/s, val {r['val']:.3f} (epoch {r['best_epoch']}),"
                      f" test {r['test']:.3f}", flush=True)
                runs.append({**r, "size": size})
            everything += runs
            groups.append(runs)
        measured.append((size, majority, groups))
    # The reference speed: the median of every matmul sample of this process (one sample alone may
    # land on a moment when neighbours hold the core).
    reference = statistics.median(r["matmul_gflops"] for r in everything)
    print(f"\n# matmul reference (float32 2048^3, 1 thread, median of this process's samples): {reference:.1f} GFLOP/s")
    panels, verdicts = [], []
    for size, majority, groups in measured:
        n_train = SIZES[size][0]
        rows = [summarize(runs, reference) for runs in groups]
        print(f"\n## {size}: {n_train} training videos")
        original = rows[0]
        modern = rows[1:]
        match = first_match(original, modern)
        full = next((m for m in modern if m["epochs"] == ORIGINAL_EPOCHS), None)
        for row in rows:
            row["test_pm"] = f"{row['test']:.3f} ± {row['test_std']:.3f}"
            row["wall_ratio"] = row["wall_s"] / original["wall_s"]
            row["work_ratio"] = row["work_s"] / original["work_s"]
            row["cpu_ratio"] = row["cpu_s"] / original["cpu_s"]
        print()
        print(table(rows, [("recipe", "recipe", "s"), ("epochs", "epochs", "d"), ("wall_s", "wall s / run", ".1f"),
                           ("cpu_s", "cpu s / run", ".1f"), ("matmul_gflops", "matmul GFLOP/s", ".1f"),
                           ("work_s", "s at ref. rate", ".1f"), ("wall_ratio", "wall / original", ".2f"),
                           ("work_ratio", "at ref. rate / original", ".2f"),
                           ("cpu_ratio", "cpu / original", ".2f"), ("val", "val acc", ".3f"),
                           ("test_pm", "test acc (mean ± std)", "s")]))
        verdict = {"size": size, "majority": majority, "original_test": original["test"]}
        if match is None:
            print(f"\n{size}: modern never reaches original's {original['test']:.3f} at budgets {budgets}")
            verdict.update(match_epochs=None, wall_ratio=None, work_ratio=None)
        else:
            verdict.update(match_epochs=match["epochs"], wall_ratio=match["wall_ratio"], work_ratio=match["work_ratio"],
                           cpu_ratio=match["cpu_ratio"])
            print(f"\n{size}: modern first reaches original's 20-epoch test accuracy {original['test']:.3f} at "
                  f"{match['epochs']} epochs ({match['test']:.3f}): wall-time ratio {match['wall_ratio']:.3f}, "
                  f"{match['work_ratio']:.3f} at the reference matmul rate, CPU-time ratio {match['cpu_ratio']:.3f}"
                  f" (goal <= 0.333)")
        if full is not None:
            verdict["gain_at_20"] = full["test"] - original["test"]
            print(f"{size}: at {ORIGINAL_EPOCHS} epochs modern is {100 * verdict['gain_at_20']:+.1f} points over original"
                  f" ({full['test']:.3f} vs {original['test']:.3f}; goal >= +2.0)")
        verdicts.append(verdict)
        panels.append({"title": f"{size}: {n_train} training videos (majority rate {majority:.2f})", "series": [
            {"label": "modern (epochs)", "color": (31, 119, 180), "x": [m["wall_s"] for m in modern],
             "y": [m["test"] for m in modern], "err": [m["test_std"] for m in modern],
             "notes": [str(m["epochs"]) for m in modern]},
            {"label": f"original ({ORIGINAL_EPOCHS} epochs)", "color": (214, 39, 40), "x": [original["wall_s"]],
             "y": [original["test"]], "err": [original["test_std"]], "notes": [str(ORIGINAL_EPOCHS)], "dashed": True},
        ]})
    ok = all(v["wall_ratio"] is not None and v["wall_ratio"] <= 1 / 3 and v.get("gain_at_20", 0) >= 0.02
             for v in verdicts)
    print(f"\n# done-when (every size: ratio <= 1/3 and >= +2 points at 20 epochs): {'met' if ok else 'NOT met'}")
    plot = line_plot(args.plot, panels, xlabel="wall seconds per run (1 thread)",
                     ylabel="test segment accuracy", title="A+V-att on synthetic AVE data: accuracy against "
                     f"wall time, mean ± std of {len(seeds)} seeds (best-on-val checkpoint)")
    print(f"# plot: {plot}")
    if args.json:
        args.json.write_text(json.dumps({"reference_gflops": reference, "runs": everything,
                                         "verdicts": verdicts}, indent=2))
        print(f"# runs: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
