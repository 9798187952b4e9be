"""One A+V-att training epoch plus one validation on a full-size AVE release layout: wall time and
peak memory, from the float64 h5 files and from the packed layout, against the model alone.

The folder (default ``/tmp/avel-e2e``, reused across runs) has the release's shapes and dtype:
``visual_feature.h5`` [4143, 10, 7, 7, 512] float64 (8 GB), ``audio_feature.h5`` [4143, 10, 128]
float64, random values; the real ``Annotations.txt`` and ``{train,val,test}_order.h5`` from
``../shared/ave`` (or made-up ones); then ``avel.data.store.pack`` writes the packed float16 layout.
``--rows`` shrinks it (free disk is checked first and the row count lowered to fit).

Each measurement runs in a fresh subprocess, so its peak resident memory (getrusage) is its own:

* ``h5``:     ``avel.engine.train.train`` for one epoch of the original recipe (batch 64, in
              order) + validation, reading the float64 h5 files;
* ``packed``: the same from the packed layout;
* ``step``:   the same training steps and validation forward passes on the whole split held in
              memory as float32 tensors (batches are slices, no data path): the floor the two
              above are compared to (its own peak memory is that 3.3 GB copy).

    python benchmarks/end_to_end.py                     # build once (minutes), then measure
    python benchmarks/end_to_end.py --rows 1200         # smaller folder
    python benchmarks/end_to_end.py --cold              # evict the feature files from the page cache first
    python benchmarks/end_to_end.py --prepare --packed-only --workdir /tmp/avel-gpu   # data for gpu.sh
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import all_threads, getrusage_peak_mb, peak_rss_mb, print_header, run_child, table  # noqa: E402

FULL_ROWS = 4143
T, GRID, DV, DA = 10, (7, 7), 512, 128
SHARED = Path(__file__).resolve().parents[2] / "shared" / "ave"


# --- the folder ------------------------------------------------------------------------------------

def bytes_needed(rows: int) -> int:
    visual = rows * T * GRID[0] * GRID[1] * DV
    audio = rows * T * DA
    return (visual + audio) * 8 + (visual + audio) * 2 + (64 << 20)       # float64 h5 + float16 packed


def fit_rows(workdir: Path, rows: int) -> int:
    """Rows that fit in the free disk of ``workdir`` (keeping 2 GB spare)."""
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    existing = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    budget = free + existing - (2 << 30)
    if bytes_needed(rows) <= budget:
        return rows
    fit = max(64, int(rows * budget / bytes_needed(rows)))
    print(f"# only {free / 2**30:.1f} GB free at {workdir}: using {fit} rows instead of {rows}")
    return fit


def build(root: Path, rows: int, seed: int = 0) -> dict:
    """Write the release-layout folder (skipped when it is already complete); returns timings."""
    import h5py

    from avel.data.store import pack

    stamp = root / "e2e.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("rows") == rows and (root / "packed" / "packed.json").is_file():
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    _metadata(root, rows, seed)
    rng = np.random.default_rng(seed)
    chunk = 64
    with h5py.File(root / "audio_feature.h5.tmp", "w") as f:
        ds = f.create_dataset("avadataset", (rows, T, DA), np.float64)
        for lo in range(0, rows, 1024):
            hi = min(rows, lo + 1024)
            ds[lo:hi] = rng.random((hi - lo, T, DA), dtype=np.float32)
    with h5py.File(root / "visual_feature.h5.tmp", "w") as f:
        ds = f.create_dataset("avadataset", (rows, T, *GRID, DV), np.float64)
        block = np.empty((chunk, T, *GRID, DV), np.float64)
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            # pool5-like: non-negative, a few large values
            np.square(rng.random(block[:hi - lo].shape, dtype=np.float32), out=block[:hi - lo], dtype=np.float64)
            ds[lo:hi] = block[:hi - lo]
            if (lo // chunk) % 16 == 15 or hi == rows:
                print(f"# writing visual_feature.h5: {hi}/{rows} rows, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    for name in ("audio_feature.h5", "visual_feature.h5"):
        (root / f"{name}.tmp").replace(root / name)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    pack(root)
    t_pack = time.perf_counter() - t0
    info = {"rows": rows, "write_s": round(t_write, 1), "pack_s": round(t_pack, 1),
            "visual_h5_gb": round((root / "visual_feature.h5").stat().st_size / 1e9, 2),
            "visual_packed_gb": round((root / "packed" / "visual.npy").stat().st_size / 1e9, 2)}
    stamp.write_text(json.dumps(info))
    return info


def build_packed_only(root: Path, rows: int, seed: int = 0) -> dict:
    """Only the packed float16 layout (no 8 GB h5): enough for ``avel train --layout packed``."""
    from avel.data.store import PACKED_DIR
    from avel.spec import AVE_OFFICIAL

    stamp = root / "e2e.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("rows") == rows and (root / PACKED_DIR / "packed.json").is_file():
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    (root / PACKED_DIR).mkdir(parents=True)
    t0 = time.perf_counter()
    _metadata(root, rows, seed)
    rng = np.random.default_rng(seed)
    for name, shape in (("audio", (rows, T, DA)), ("visual", (rows, T, *GRID, DV))):
        arr = np.lib.format.open_memmap(root / PACKED_DIR / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape)
        for lo in range(0, rows, 256):
            hi = min(rows, lo + 256)
            arr[lo:hi] = rng.random((hi - lo, *shape[1:]), dtype=np.float32)
        arr.flush()
        del arr
    (root / PACKED_DIR / "packed.json").write_text(json.dumps(
        {"source": {"audio": "random", "visual": "random"}, "dtype": "float16", "rows": rows,
         "spec": AVE_OFFICIAL.to_dict()}, indent=2))
    info = {"rows": rows, "write_s": round(time.perf_counter() - t0, 1), "pack_s": 0.0, "visual_h5_gb": 0.0,
            "visual_packed_gb": round((root / PACKED_DIR / "visual.npy").stat().st_size / 1e9, 2)}
    stamp.write_text(json.dumps(info))
    return info


def _metadata(root: Path, rows: int, seed: int) -> None:
    """Annotations.txt and split orders: the real ones (first ``rows`` lines) when available."""
    import h5py

    real = SHARED / "Annotations.txt"
    if real.is_file():
        lines = [ln for ln in real.read_text().splitlines() if ln.strip()]
        header = lines[0] if lines[0].split("&")[0].strip().lower() in {"category", "event", "class"} else None
        body = lines[1:] if header else lines
        (root / "Annotations.txt").write_text("\n".join(([header] if header else []) + body[:rows]) + "\n")
        for split in ("train", "val", "test"):
            with h5py.File(SHARED / f"{split}_order.h5", "r") as f:
                order = np.asarray(f["order"][()]).reshape(-1)
            order = order[order < rows]
            with h5py.File(root / f"{split}_order.h5", "w") as f:
                f.create_dataset("order", data=order.astype(np.int64))
        return
    from importlib.resources import files

    names = [n.strip() for n in files("avel").joinpath("resources/ave_categories.txt").read_text().splitlines() if n.strip()]
    rng = np.random.default_rng(seed)
    cats = np.concatenate([np.arange(len(names)), rng.integers(0, len(names), max(0, rows - len(names)))])[:rows]
    out = []
    for i, c in enumerate(cats):
        s = int(rng.integers(0, 9))
        out.append(f"{names[c]}&vid{i:05d}&good&{s}&{int(rng.integers(s + 1, 11))}")
    (root / "Annotations.txt").write_text("\n".join(out) + "\n")
    perm = rng.permutation(rows)
    n_tr, n_va = int(rows * 3339 / 4143), int(rows * 402 / 4143)
    for split, idx in (("train", perm[:n_tr]), ("val", perm[n_tr:n_tr + n_va]), ("test", perm[n_tr + n_va:])):
        with h5py.File(root / f"{split}_order.h5", "w") as f:
            f.create_dataset("order", data=np.sort(idx).astype(np.int64))


def evict(root: Path) -> None:
    """Drop this folder's feature files from the page cache (only these files)."""
    for p in [*root.glob("*.h5"), *(root / "packed").glob("*.npy")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- measurements (each in its own process) ------------------------------------------------------------

def child(mode: str, root: Path, out: Path, threads: int, model: str) -> dict:
    from dataclasses import replace

    import torch

    from avel.config import recipe

    torch.set_num_threads(threads)
    cfg = recipe("original")
    cfg = replace(cfg, model=model, epochs=1, eval_every=1, threads=threads,
                  data=replace(cfg.data, root=str(root), layout="packed" if mode == "packed" else "h5"))
    if mode in ("h5", "packed"):
        from avel.engine.train import train

        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        train(cfg, out, progress=False)
        total = time.perf_counter() - t0
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        return {"mode": mode, "epoch_s": rec["train_seconds"], "val_s": rec["val_seconds"],
                "epoch_val_s": rec["train_seconds"] + rec["val_seconds"], "total_s": total,
                "peak_rss_mb": peak_rss_mb(), "maxrss_mb": getrusage_peak_mb(), "val_accuracy": rec["val"]["accuracy"]}
    # step-only: the same steps and validation batches on in-memory tensors.
    from avel.data.datasets import AVEData
    from avel.engine.train import make_optimizer
    from avel.models import build_model
    from avel.tasks import SupervisedTask

    data = AVEData.open(root, layout="h5")
    n_train, n_val = len(data.split("train")), len(data.split("val"))
    C = data.num_classes
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model(model, num_classes=C)
    opt = make_optimizer(model.parameters(), cfg)
    task = SupervisedTask()
    # The whole training split as float32 tensors in memory (3.3 GB for AVE): batches are slices.
    full = {"audio": torch.rand(n_train, T, DA, generator=g), "visual": torch.rand(n_train, T, *GRID, DV, generator=g)}
    full["target"] = torch.nn.functional.one_hot(torch.randint(0, C, (n_train, T), generator=g), C).float()
    starts = list(range(0, n_train, 64))
    vis = torch.rand(256, T, *GRID, DV, generator=g)
    aud = torch.rand(256, T, DA, generator=g)

    def train_steps(starts):
        model.train()
        for lo in starts:
            batch = {k: v[lo:lo + 64] for k, v in full.items()}
            b = len(batch["audio"])
            loss = task.losses(model, batch).sum() / b
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.inference_mode()
    def validate(n):
        model.eval()
        for lo in range(0, n, 256):
            b = min(256, n - lo)
            model(aud[:b], vis[:b])["logits"].softmax(-1).numpy()

    train_steps(starts[:1])         # warm-up (first-call costs are not the data path's)
    validate(min(n_val, 256))
    t0 = time.perf_counter()
    train_steps(starts)
    epoch = time.perf_counter() - t0
    t0 = time.perf_counter()
    validate(n_val)
    val = time.perf_counter() - t0
    return {"mode": "step", "epoch_s": epoch, "val_s": val, "epoch_val_s": epoch + val, "total_s": epoch + val,
            "peak_rss_mb": peak_rss_mb(), "maxrss_mb": getrusage_peak_mb(), "steps": len(starts)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/avel-e2e"))
    p.add_argument("--rows", type=int, default=FULL_ROWS, help=f"videos in the folder (release: {FULL_ROWS})")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--model", default="av_att")
    p.add_argument("--modes", default="h5,packed,step")
    p.add_argument("--repeats", type=int, default=1, help="measure each mode this many times (medians)")
    p.add_argument("--cold", action="store_true", help="evict the feature files from the page cache before each run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--build", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help="only write the folder (reused if there) and exit")
    p.add_argument("--packed-only", action="store_true",
                   help="write only the packed float16 layout, no float64 h5 (for --prepare; the h5 mode needs the h5)")
    args = p.parse_args(argv)
    threads = args.threads or all_threads()
    root = args.workdir / "ave"
    if args.child:
        print(json.dumps(child(args.child, root, args.workdir / "runs" / args.child, threads, args.model)))
        return 0
    if args.build:
        print(json.dumps((build_packed_only if args.packed_only else build)(root, args.build)))
        return 0

    print_header("end to end: one training epoch + one validation, float64 h5 vs packed vs model only")
    rows = fit_rows(args.workdir, args.rows)
    # Built in a child process: the parent stays small, so the measuring children (which inherit
    # the parent's getrusage high-water mark) report their own peak either way.
    info = run_child([__file__, "--build", str(rows), "--workdir", str(args.workdir)]
                     + (["--packed-only"] if args.packed_only else []))
    print(f"# folder {root}: {info['rows']} rows, visual_feature.h5 {info['visual_h5_gb']} GB float64, "
          f"packed {info['visual_packed_gb']} GB float16 (written in {info['write_s']}s, packed in {info['pack_s']}s)")
    if args.prepare:
        print(f"{root}")
        return 0
    print(f"# model {args.model}, original recipe (batch 64, in order), {threads} threads, "
          f"{'cold' if args.cold else 'warm'} page cache")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in args.modes.split(","):
            if args.cold and mode != "step":
                evict(root)
            r = run_child([__file__, "--child", mode, "--workdir", str(args.workdir), "--threads", str(threads),
                           "--model", args.model])
            results.setdefault(mode, []).append(r)
            print(f"{mode:7s} epoch {r['epoch_s']:7.1f}s  validation {r['val_s']:5.2f}s  "
                  f"epoch+val {r['epoch_val_s']:7.1f}s  whole run {r['total_s']:7.1f}s  peak RSS {r['peak_rss_mb']:7.0f} MB",
                  flush=True)
    rows_out = []
    steps = results.get("step")
    for mode, rs in results.items():
        ev = float(np.median([r["epoch_val_s"] for r in rs]))
        # Ratio to the step-only run of the same repeat (measured minutes apart, not hours).
        ratio = float(np.median([r["epoch_val_s"] / s["epoch_val_s"] for r, s in zip(rs, steps)])) if steps else math.nan
        rows_out.append({"mode": {"h5": "float64 h5", "packed": "packed float16", "step": "step only (in memory)"}[mode],
                         "epoch": float(np.median([r["epoch_s"] for r in rs])), "val": float(np.median([r["val_s"] for r in rs])),
                         "ev": ev, "ratio": ratio, "rss": float(np.median([r["peak_rss_mb"] for r in rs]))})
    print()
    print(table(rows_out, [("mode", "data path", "s"), ("epoch", "epoch (s)", ".1f"), ("val", "validation (s)", ".2f"),
                           ("ev", "epoch + val (s)", ".1f"), ("ratio", "x step-only", ".2f"),
                           ("rss", "peak RSS (MB)", ".0f")]))
    print("x step-only: median over repeats of (this mode / the step-only run of the same repeat); "
          "peak RSS: VmHWM of the measuring process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
