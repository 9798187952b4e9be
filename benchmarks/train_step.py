"""Training-step throughput of every registered segment model on AVE-shaped batches.

Every model that returns segment scores (``avel.available_models()``, so one registered tomorrow is
covered tomorrow) trains in its own task: the first of its class's ``tasks`` (supervised for the
2018 models, the weak task for the ``*_weak`` variants). One step = forward + that task's loss
(``task.losses(model, batch)``: the model's own ``loss_terms`` with its ``loss_weights`` where it has
them, else the original recipe's soft-margin loss on softmax outputs) + backward + the optimizer
``avel.engine.train`` builds (``make_optimizer``, Adam 1e-3: the default recipe's, the same for every
model), with ``zero_grad(set_to_none=True)``: what the trainer runs per batch, on in-memory tensors
(B=64, T=10, 7x7x512 visual, 128 audio; the batch carries segment targets and video labels).

Reported per model and thread count: videos/s and the achieved FLOP rate as a fraction of a
float32 matmul rate measured in the same process, interleaved round by round (see
``benchmarks/common.py`` for the clocks and the FLOP convention: Linear 2*in*out per row, LSTM
2*4h*(in+h) per step and direction, training = 3x forward except that no gradient of the input
data is computed; the plain 3x figure is printed too). Medians over rounds. FLOPs are analytic for
the 2018 models (``common.model_flops``) and *counted* for every other model: FlopCounterMode over
one real forward + loss + backward of the batch (``common.counted_flops``), i.e. the matrix and LSTM
work as dispatched, whose backward holds the weights' gradients (and the activation gradients on
the way to them) but none for the input data, as autograd actually ran it. Parameter counts are
printed per model.

    python benchmarks/train_step.py                      # all models, 1 thread and all threads
    python benchmarks/train_step.py --models av_att --rounds 9 --threads 1
    python benchmarks/train_step.py --compile            # also torch.compile (first step + steady)
    python benchmarks/train_step.py --reference          # also av_att in the 2018 formulation
    python benchmarks/train_step.py --device cuda --amp  # GPU, also bf16 autocast
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Flops,
    MatmulRate,
    all_threads,
    ave_batch,
    clock_for,
    clock_name,
    counted_flops,
    has_analytic_flops,
    median,
    model_flops,
    model_tasks,
    param_count,
    print_header,
    segment_models,
    set_threads,
    sync,
    table,
)

from avel.config import RunConfig  # noqa: E402
from avel.engine.train import make_optimizer  # noqa: E402
from avel.models import build_model, model_class  # noqa: E402
from avel.tasks import build_task, check_model  # noqa: E402


def model_task(name: str):
    """The task a model is benchmarked in: the first of its class's ``tasks``."""
    base = name.partition(":")[0]
    task = build_task(RunConfig(model=base, task=model_tasks(base)[0]))
    check_model(task, model_class(base))
    return task


def make_step(name: str, batch: dict, *, device: str, amp: bool = False, compile: bool = False):
    """(step, model, count): one training step; the model; ``count()`` -> its counted FLOPs."""
    torch.manual_seed(0)
    base, _, variant = name.partition(":")
    model = build_model(base).to(device).train()
    if variant == "reference":                 # the attention as separate modules (the 2018 code's form)
        model.attention.forward = model.attention.reference
    net = torch.compile(model) if compile else model
    optimizer = make_optimizer(model.parameters(), RunConfig())
    task = model_task(name)
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"

    def forward_loss(m):
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            return task.losses(m, batch).mean()

    def step():
        loss = forward_loss(net)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def count() -> Flops:
        # One real forward + loss + backward of the eager model (torch.compile does the same math);
        # no optimizer step, and the gradients are dropped again.
        optimizer.zero_grad(set_to_none=True)
        flops = counted_flops(lambda: forward_loss(model))
        optimizer.zero_grad(set_to_none=True)
        return flops

    return step, model, count


_COUNTED: dict[tuple, Flops] = {}


def step_flops(name: str, batch_size: int, device: str, count) -> tuple[Flops, str]:
    """(FLOPs of one step of the batch, 'analytic' | 'counted'); counted once per model and device."""
    base = name.partition(":")[0]
    if has_analytic_flops(base):
        return model_flops(base, videos=batch_size), "analytic"
    key = (base, batch_size, str(device))
    if key not in _COUNTED:
        _COUNTED[key] = count()
    return _COUNTED[key], "counted"


def measure(name: str, *, batch_size: int, threads: int, rounds: int, min_round_s: float, device: str,
            amp: bool = False, compile: bool = False) -> dict:
    clock = clock_for(threads) if device == "cpu" else time.perf_counter
    batch = ave_batch(batch_size, device=device)
    ref = MatmulRate(n=2048 if device == "cpu" else 4096, device=device,
                     dtype=torch.bfloat16 if amp else torch.float32)
    step, model, count = make_step(name, batch, device=device, amp=amp, compile=compile)
    flops, source = step_flops(name, batch_size, device, count)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    step()
    sync(device)
    # Steps per round: enough for ``min_round_s`` of work.
    t = clock()
    step()
    sync(device)
    per = max(clock() - t, 1e-6)
    n = max(1, int(min_round_s / per))
    fracs, rates, fracs3 = [], [], []
    for _ in range(rounds):
        mm = ref.sample(clock)
        sync(device)
        t = clock()
        for _ in range(n):
            step()
        sync(device)
        dt = (clock() - t) / n
        rates.append(batch_size / dt)
        fracs.append(flops.train / dt / mm)
        fracs3.append(flops.train_x3 / dt / mm)
    return {"model": name, "task": model_task(name).name, "params": param_count(model), "flops": source,
            "threads": threads, "device": device, "amp": amp, "compile": compile,
            "videos_per_s": median(rates), "frac_matmul": median(fracs), "frac_matmul_x3": median(fracs3),
            "frac_min": min(fracs), "frac_max": max(fracs), "steps_per_round": n, "rounds": rounds,
            "first_step_s": first, "gflop_per_video": flops.train / batch_size / 1e9,
            "matmul_gflops": ref.sample(clock) / 1e9, "clock": clock_name(threads) if device == "cpu" else "wall time"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(segment_models()),
                   help="comma list of registered segment models (default: every one registered)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", default="1,all", help="comma list of thread counts; 'all' = every core")
    p.add_argument("--rounds", type=int, default=7, help="interleaved (matmul, steps) rounds; medians reported")
    p.add_argument("--min-round-s", type=float, default=0.4, help="work per round (seconds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="also measure bf16 autocast (reference: bf16 matmul)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--reference", action="store_true",
                   help="also measure av_att with the attention as separate modules (the 2018 formulation)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    known = segment_models()
    unknown = [m for m in models if m.partition(":")[0] not in known]
    if unknown:
        p.error(f"not registered segment models: {', '.join(unknown)} (available: {', '.join(known)})")
    print_header("training step: forward + loss + backward + Adam, AVE-shaped batches, each model in its "
                 "own task (the first of its class's tasks)")
    analytic = [m for m in models if has_analytic_flops(m.partition(":")[0])]
    counted = [m for m in models if not has_analytic_flops(m.partition(":")[0])]
    if analytic:
        print(f"# FLOPs analytic (benchmarks/common.py model_flops) for {', '.join(analytic)}")
    if counted:
        print(f"# FLOPs COUNTED, not analytic, for {', '.join(counted)}:\n"
              "#   torch.utils.flop_counter.FlopCounterMode over one real training step (forward + loss +\n"
              "#   backward of this batch; matmul/bmm and LSTM kernels as dispatched; elementwise work and the\n"
              "#   optimizer not counted). The backward includes the gradient of nothing but the weights (and the\n"
              "#   activation gradients on the way to them) as actually run: no gradient of the input data, except\n"
              "#   that the CPU oneDNN LSTM kernel always computes its input's gradient (counted: it runs)")
    if args.reference and "av_att" in models:
        models.insert(models.index("av_att") + 1, "av_att:reference")
    threads = [all_threads() if t == "all" else int(t) for t in args.threads.split(",")] if args.device == "cpu" else [0]
    variants = [(False, False)]
    if args.amp:
        variants.append((True, False))
    if args.compile:
        variants.append((False, True))
    rows = []
    for th in threads:
        if th:
            set_threads(th)
        for amp, comp in variants:
            for name in models:
                r = measure(name, batch_size=args.batch_size, threads=th or torch.get_num_threads(),
                            rounds=args.rounds, min_round_s=args.min_round_s, device=args.device, amp=amp,
                            compile=comp)
                rows.append(r)
                tag = ("+bf16" if amp else "") + ("+compile" if comp else "")
                print(f"{name + tag:18s} {r['task']:10s} {r['params'] / 1e6:5.2f} M params  "
                      f"threads={r['threads']:2d}  {r['videos_per_s']:8.1f} videos/s  "
                      f"{100 * r['frac_matmul']:5.1f}% of matmul ({100 * r['frac_min']:.0f}-{100 * r['frac_max']:.0f}%)  "
                      f"[x3 count: {100 * r['frac_matmul_x3']:.1f}%]  matmul {r['matmul_gflops']:.0f} GFLOP/s  "
                      f"{r['gflop_per_video']:.3f} GFLOP/video ({r['flops']})  "
                      f"first step {r['first_step_s']:.2f}s", flush=True)
    # Summary table: one row per model/variant, thread counts side by side.
    print()
    print(f"batch {args.batch_size}; FLOPs/video/step (executed; * = counted, else analytic): "
          + ", ".join(dict.fromkeys(f"{r['model']} {r['gflop_per_video']:.3f} G" + ("*" if r["flops"] == "counted" else "")
                                    for r in rows if ":" not in r["model"])))
    if args.device == "cpu":
        print("clock: thread CPU time at 1 thread, wall time otherwise; fraction = achieved FLOP rate / "
              "float32 2048^3 matmul rate in the same process, median over rounds")
    else:
        print("clock: wall time with device synchronisation; fraction = achieved FLOP rate / 4096^3 matmul rate "
              "on the device (float32; bf16 for +bf16 rows), median over rounds")
    if any(m.endswith(":reference") for m in models):
        print(":reference = the attention as separate modules (the 2018 formulation), for comparison")
    summary, labels = {}, []
    for r in rows:
        key = r["model"] + ("+bf16" if r["amp"] else "") + ("+compile" if r["compile"] else "")
        label = args.device if args.device != "cpu" else (f"{r['threads']} thread" + ("s" if r["threads"] > 1 else ""))
        if label not in labels:
            labels.append(label)
        s = summary.setdefault(key, {"model": key, "task": r["task"], "params": r["params"] / 1e6,
                                     "gflop": r["gflop_per_video"], "flops": r["flops"]})
        s[f"vps {label}"] = r["videos_per_s"]
        s[f"frac {label}"] = 100 * r["frac_matmul"]
    cols = [("model", "model", "s"), ("task", "task", "s"), ("params", "params (M)", ".2f"),
            ("gflop", "GFLOP/video/step", ".3f"), ("flops", "FLOPs", "s")]
    for label in labels:
        cols += [(f"vps {label}", f"videos/s ({label})", ".0f"), (f"frac {label}", f"% of matmul ({label})", ".0f")]
    print(table(list(summary.values()), cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
