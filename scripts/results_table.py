"""The README's results table: every registered segment model, in each task it trains in, on
`avel data synth` data at two sizes, with its own recipe (``paper`` for the follow-up models,
``original`` for the 2018 ones) and with ``modern``; test segment accuracy (and video accuracy in
the weak task) mean ± std over seeds, each run selected on validation only, and each run's wall time.

    python scripts/results_table.py --out /work/results/table            # run (resumable)
    python scripts/results_table.py --out /work/results/table --plan     # what would run, estimated s
    python scripts/results_table.py --out /work/results/table --markdown # print the finished table
    python scripts/results_table.py --out /work/results/table --measure  # 1 epoch per model and size

Every (size, model, task, recipe, seed) is one *cell*: one run, written as ``OUT/cells/<cell>.json``
when it finishes (a failure is written as ``<cell>.failed.json`` with its traceback). A rerun skips
every finished cell whose resolved run config is still the one the cell ran with, so a re-tuned
recipe (``modern`` is read from ``avel/recipes/modern-*.yaml`` when a cell starts, never copied
here) reruns only its own cells; a cell killed mid-run starts again from scratch (its wall time
is always one uninterrupted run). Runs are one at a time, single-threaded (``--set threads=1``).

Each cell is exactly ``avel train --data-root DATA --model M --task T --recipe R --seeds S
--set threads=1 [--set epochs=N]`` (the same ``resolve_run_config`` and ``train_seeds``).

The compute budget (about 75 minutes on one core of a 2-core machine) does not hold every recipe
in full: :data:`CAPS` caps the epochs of some cells with ``--set epochs=N``, chosen from
``--measure``, and the table says so in its "epochs run" column ("30 of 200"). A capped run is the
recipe with fewer epochs: a ``multistep`` schedule is cut where the run stops, a ``cosine`` one
(``modern``) is compressed into the shorter run (it scales with the run's iterations).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from avel.config import recipe_file, resolve_run_config
from avel.models import available_models
from avel.models.registry import model_class

SEEDS = (1, 2, 3)
SEGMENT_TASKS = ("supervised", "weak")


@dataclass(frozen=True)
class Size:
    key: str
    videos: int
    background_videos: int
    label: str


# 400 videos: `avel data synth`'s default (320 train / 40 val / 40 test, 200 background videos).
# AVE size: the release's 4,143 rows and its 178 background videos (splits 0.8 / 0.1 / 0.1).
SIZES = {"400": Size("400", 400, 200, "400 videos"),
         "ave": Size("ave", 4143, 178, "4,143 videos (AVE size)")}


# --- the plan: what runs, in which order, with which epoch cap ------------------------------------
#
# Chosen from `--measure` (one epoch of every model, task and recipe at 400 videos, and of every
# model and task with `modern` at the AVE size; one thread; the machine shared with two other
# processes), to fit the whole table in about 75 minutes of wall time:
#
#   s per epoch, 400 videos     supervised   weak      s per epoch, AVE size (modern)
#   audio, visual, av           0.15-0.35    0.25-0.6  1.7-3.8
#   av_att, visual_att, dmrn    0.9-1.7      1.5-2.5   14-22
#   psp, cpsp, avsdn            0.9-2.0      1.6-4.3   13-21
#   cmran, cmbs                 8-14         13-18     75-103
#
# The full recipes at 400 videos alone would take about 19 hours (the 2018 recipes run 250-300
# epochs, the transformers' 200), so every (model, task) at 400 videos gets an epoch cap that keeps a
# run near 20 s, the same cap for both of its recipes (recipes compared at equal epochs). At the AVE
# size (an epoch has ~10x the iterations of one at 400 videos) only `modern` runs, 2 epochs for every
# model; CMRAN and CMBS are left out there (one epoch alone is 75-100 s per run, x3 seeds, x2 tasks).
# A cap is the most epochs a cell runs: a recipe with fewer epochs runs in full.

CAPS_400: dict[tuple[str, str], int] = {
    ("audio", "supervised"): 60, ("audio", "weak"): 40,
    ("visual", "supervised"): 60, ("visual", "weak"): 40,
    ("av", "supervised"): 60, ("av", "weak"): 40,
    ("av_att", "supervised"): 10, ("av_att", "weak"): 10,
    ("visual_att", "supervised"): 10, ("visual_att", "weak"): 10,
    ("dmrn", "supervised"): 10, ("dmrn", "weak"): 10,
    ("psp", "supervised"): 20, ("psp_weak", "weak"): 10,    # psp: batch 128, drop_last -> 2 steps/epoch
    ("cpsp", "supervised"): 10, ("cpsp_weak", "weak"): 5,
    ("avsdn", "supervised"): 10, ("avsdn", "weak"): 5,
    ("cmran", "supervised"): 3, ("cmran_weak", "weak"): 3,
    ("cmbs", "supervised"): 3, ("cmbs_weak", "weak"): 3,
}
DEFAULT_CAP_400 = 5            # a model registered after this plan was made (its cost is unknown)
AVE_RECIPE, AVE_CAP = "modern", 2
AVE_LEFT_OUT = ("cmran", "cmran_weak", "cmbs", "cmbs_weak")

# Tiers run in order (lower first); a later tier is what is dropped when time runs out.
TIER_400, TIER_AVE = 1, 2


def home_recipe(model: str, task: str) -> str:
    """``paper`` where the model has its own paper recipe for the task (follow-ups), else ``original``."""
    found = recipe_file("paper", task, model)
    return "paper" if found and found.count("-") >= 2 else "original"


def segment_models() -> list[tuple[str, str]]:
    """(model, task) for every registered segment model and every segment task it trains in."""
    pairs = []
    for name in available_models():
        cls = model_class(name)
        if "segment_scores" not in getattr(cls, "outputs", ()):
            continue
        tasks = getattr(cls, "tasks", None) or SEGMENT_TASKS
        pairs += [(name, t) for t in SEGMENT_TASKS if t in tasks]
    return pairs


@dataclass(frozen=True)
class Cell:
    size: str
    model: str
    task: str
    recipe: str
    seed: int
    cap: int | None
    tier: int

    @property
    def name(self) -> str:
        return f"{self.size}__{self.model}__{self.task}__{self.recipe}__seed{self.seed}"

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.size, self.model, self.task, self.recipe)


def plan(seeds=SEEDS) -> list[Cell]:
    cells = []
    for model, task in segment_models():
        cap = CAPS_400.get((model, task), DEFAULT_CAP_400)
        for rec in (home_recipe(model, task), "modern"):
            cells += [Cell("400", model, task, rec, s, cap, TIER_400) for s in seeds]
    for model, task in segment_models():
        if model not in AVE_LEFT_OUT:
            cells += [Cell("ave", model, task, AVE_RECIPE, s, AVE_CAP, TIER_AVE) for s in seeds]
    return sorted(cells, key=lambda c: c.tier)          # stable: model/task/recipe/seed order within a tier


def left_out() -> list[str]:
    """The (size, model, task, recipe) groups the plan does not run (said under the table)."""
    out = []
    for model, task in segment_models():
        for rec in (home_recipe(model, task), "modern"):
            if rec != AVE_RECIPE or model in AVE_LEFT_OUT:
                out.append(f"{model} {task} {rec}")
    return out


# --- data ---------------------------------------------------------------------------------------

def data_root(out: Path, size: str) -> Path:
    return out / "data" / f"synth-{size}"


def ensure_data(out: Path, size: str) -> Path:
    from avel.data.synth import SynthConfig, generate

    root = data_root(out, size)
    done = root / ".complete"
    if not done.is_file():
        s = SIZES[size]
        if root.exists():
            shutil.rmtree(root)
        t0 = time.perf_counter()
        generate(root, SynthConfig(videos=s.videos, background_videos=s.background_videos))
        done.write_text(f"{time.perf_counter() - t0:.1f} s\n")
        log(f"wrote {root} ({s.label}) in {time.perf_counter() - t0:.0f} s")
    return root


def majority_rate(root: Path) -> dict:
    from avel.data.datasets import AVEData

    data = AVEData.open(root)
    out = {}
    for split in ("train", "val", "test"):
        rows = data.split(split)
        target = data.targets[rows].argmax(-1)
        out[split] = {"rows": int(len(rows)),
                      "majority_segment_rate": float((target == np.bincount(target.ravel()).argmax()).mean())}
    return out


# --- one cell -----------------------------------------------------------------------------------

def cell_config(cell: Cell, root: Path, epochs_override: int | None = None):
    """The run config of a cell, resolved as `avel train` resolves it (the recipe read now)."""
    base = resolve_run_config(recipe_name=cell.recipe, task=cell.task, model=cell.model)
    overrides = ["threads=1"]
    epochs = epochs_override if epochs_override is not None else cell.cap
    if epochs is not None and epochs < base.epochs:
        overrides.append(f"epochs={epochs}")
    config = resolve_run_config(recipe_name=cell.recipe, task=cell.task, model=cell.model, overrides=overrides,
                                data_root=str(root), seed=cell.seed)
    return config, base.epochs, overrides


def command_of(cell: Cell, root: Path, overrides: list[str], run_dir: Path) -> str:
    sets = " ".join(f"--set {o}" for o in overrides)
    return (f"avel train --data-root {root} --model {cell.model} --task {cell.task} --recipe {cell.recipe} "
            f"--seeds {cell.seed} {sets} --no-progress --out {run_dir}")


def run_cell(cell: Cell, out: Path, *, epochs_override: int | None = None, run_dir: Path | None = None) -> dict:
    from avel.engine.train import train_seeds

    root = ensure_data(out, cell.size)
    config, recipe_epochs, overrides = cell_config(cell, root, epochs_override)
    run_dir = run_dir or out / "runs" / cell.size / cell.model / f"{cell.task}-{cell.recipe}-seed{cell.seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)                         # a killed run starts again: one uninterrupted run
    t0 = time.perf_counter()
    summary = train_seeds(config, run_dir, [cell.seed], progress=False)
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (run_dir / f"seed-{cell.seed}" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    improved = [r["epoch"] for r in history if r.get("improved")]
    run = summary["runs"][str(cell.seed)]
    return {
        "cell": cell.name, "size": cell.size, "model": cell.model, "task": cell.task, "recipe": cell.recipe,
        "seed": cell.seed, "cap": cell.cap, "recipe_epochs": recipe_epochs, "epochs_run": len(history),
        "best_epoch": improved[-1] if improved else None, "selection": "video_accuracy" if cell.task == "weak"
        else "accuracy", "wall_seconds": round(wall, 2),
        "train_seconds": round(sum(r.get("train_seconds", 0.0) for r in history), 2),
        "val_seconds": round(sum(r.get("val_seconds", 0.0) for r in history), 2),
        "val": run["val"], "test": run["test"], "overrides": overrides,
        "command": command_of(cell, root, overrides, run_dir), "config": config.to_dict(), "code": code_version(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cell_path(out: Path, cell: Cell, failed: bool = False) -> Path:
    return out / "cells" / (cell.name + (".failed.json" if failed else ".json"))


def same_config(recorded: dict, current: dict) -> bool:
    return json.dumps(recorded, sort_keys=True) == json.dumps(current, sort_keys=True)


def cell_state(out: Path, cell: Cell) -> tuple[str, dict | None]:
    """('done' | 'failed' | 'stale' | 'todo', the cell's JSON)."""
    for failed in (False, True):
        p = cell_path(out, cell, failed)
        if p.is_file():
            rec = json.loads(p.read_text())
            root = data_root(out, cell.size)
            try:
                config, _, _ = cell_config(cell, root)
                current = config.to_dict()
            except Exception:                          # noqa: BLE001 - a recipe that no longer resolves
                current = None
            if current is not None and not same_config(rec.get("config", {}), current):
                return "stale", rec
            return ("failed" if failed else "done"), rec
    return "todo", None


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


_CODE: dict | None = None


def code_version() -> dict:
    """The commit and a hash of the uncommitted changes to avel/ (the tree is shared and edited)."""
    global _CODE
    if _CODE is None:
        import hashlib
        import subprocess

        repo = Path(__file__).resolve().parent.parent
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                  text=True, check=True).stdout.strip()
            diff = subprocess.run(["git", "diff", "HEAD", "--", "avel"], cwd=repo, capture_output=True,
                                  text=True, check=True).stdout
            _CODE = {"commit": head, "avel_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}
        except (OSError, subprocess.CalledProcessError):
            _CODE = {"commit": None, "avel_diff_sha1": None}
    return _CODE


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# --- estimates from --measure -------------------------------------------------------------------

def load_measure(out: Path) -> dict:
    p = out / "measure.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def estimate(cell: Cell, measure: dict) -> float | None:
    """Seconds a cell should take: fixed cost + epochs x (train epoch + validation / eval_every)."""
    m = measure.get(f"{cell.size}__{cell.model}__{cell.task}__{cell.recipe}")
    if m is None:                                      # the other recipe at this size, scaled as at 400
        other = "modern" if cell.recipe != "modern" else home_recipe(cell.model, cell.task)
        o = measure.get(f"{cell.size}__{cell.model}__{cell.task}__{other}")
        a = measure.get(f"400__{cell.model}__{cell.task}__{cell.recipe}")
        b = measure.get(f"400__{cell.model}__{cell.task}__{other}")
        if not (o and a and b):
            return None
        m = {k: o[k] * a[k] / max(b[k], 1e-3) for k in ("train_seconds", "val_seconds")}
        m["fixed_seconds"] = o["fixed_seconds"]
    base = resolve_run_config(recipe_name=cell.recipe, task=cell.task, model=cell.model)
    epochs = min(base.epochs, cell.cap) if cell.cap else base.epochs
    per_epoch = m["train_seconds"] + m["val_seconds"] / base.eval_every
    return m["fixed_seconds"] + epochs * per_epoch


def measure(out: Path, sizes, recipes: str = "both") -> None:
    """One epoch of every (model, task, recipe) at each size (stored in OUT/measure.json)."""
    result = load_measure(out)
    for size in sizes:
        for model, task in segment_models():
            for rec in (home_recipe(model, task), "modern"):
                if recipes != "both" and (rec == "modern") != (recipes == "modern"):
                    continue
                key = f"{size}__{model}__{task}__{rec}"
                if key in result:
                    continue
                cell = Cell(size, model, task, rec, 1, None, 0)
                try:
                    r = run_cell(cell, out, epochs_override=1, run_dir=out / "measure-runs" / key)
                except Exception:                      # noqa: BLE001
                    log(f"measure {key}: FAILED\n{traceback.format_exc()}")
                    continue
                fixed = r["wall_seconds"] - r["train_seconds"] - r["val_seconds"]
                result[key] = {"train_seconds": r["train_seconds"], "val_seconds": r["val_seconds"],
                               "fixed_seconds": round(fixed, 2), "wall_seconds": r["wall_seconds"]}
                write_json(out / "measure.json", result)
                log(f"measure {key}: 1 epoch train {r['train_seconds']:.1f} s, val {r['val_seconds']:.1f} s, "
                    f"fixed {fixed:.1f} s")
        shutil.rmtree(out / "measure-runs", ignore_errors=True)


# --- the table ----------------------------------------------------------------------------------

MODEL_LABEL = {"audio": "A", "visual": "V", "visual_att": "V-att", "av": "A+V", "av_att": "A+V-att",
               "dmrn": "DMRN", "psp": "PSP", "psp_weak": "PSP", "cpsp": "CPSP", "cpsp_weak": "CPSP",
               "avsdn": "AVSDN", "cmran": "CMRAN", "cmran_weak": "CMRAN", "cmbs": "CMBS", "cmbs_weak": "CMBS"}


TABLE_ORDER = ("audio", "visual", "visual_att", "av", "av_att", "dmrn", "psp", "psp_weak", "cpsp", "cpsp_weak",
               "avsdn", "cmran", "cmran_weak", "cmbs", "cmbs_weak")


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return f"{v.mean():.3f} ± {std:.3f}"


def markdown(out: Path, argv_hint: str) -> str:
    cells = plan()
    groups: dict[tuple, list[Cell]] = {}
    rank = {m: i for i, m in enumerate(TABLE_ORDER)}
    for c in sorted(cells, key=lambda c: (list(SIZES).index(c.size), SEGMENT_TASKS.index(c.task),
                                          rank.get(c.model, len(rank)), c.model, c.recipe == "modern")):
        groups.setdefault(c.group, []).append(c)
    lines, failures, total_wall, n_done = [], [], 0.0, 0
    rates = {}
    for size in SIZES:
        p = out / "data" / f"synth-{size}" / ".majority.json"
        if not p.is_file() and (data_root(out, size) / ".complete").is_file():
            write_json(p, majority_rate(data_root(out, size)))
        if p.is_file():
            rates[size] = json.loads(p.read_text())
    header = ("| task | model | recipe | epochs run (of recipe) | best epoch | val (selection) | "
              "test segment accuracy | test video accuracy | s/run (seeds) |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    current_size = None
    notes = []
    for key, group in groups.items():
        size, model, task, rec = key
        if size != current_size:
            if current_size is not None:
                lines.append("")
            r = rates.get(size, {}).get("test")
            sub = (f" — test {r['rows']} videos; majority-class (background) segment rate "
                   f"{r['majority_segment_rate']:.3f}; the video's class on every segment scores "
                   f"{1 - r['majority_segment_rate']:.3f}" if r else "")
            lines += [f"**{SIZES[size].label}**{sub}", "", header, rule]
            current_size = size
        done, missing = [], []
        for c in group:
            state, rec_json = cell_state(out, c)
            if state == "done":
                done.append(rec_json)
            elif state == "failed":
                failures.append(rec_json)
                missing.append(f"seed {c.seed} failed")
            elif state == "stale":                      # shown, but said: a rerun redoes it
                done.append(rec_json)
                notes.append(f"{c.name}: ran with another config than {c.recipe} resolves to now (the recipe "
                             "was changed since); a rerun redoes it")
            else:
                missing.append(f"seed {c.seed} not run")
        label = f"{MODEL_LABEL.get(model, model)} (`{model}`)"
        if not done:
            why = "failed" if any("failed" in m for m in missing) else "not run"
            lines.append(f"| {task} | {label} | {rec} | | | | {why} | | |")
            continue
        n_done += len(done)
        walls = [d["wall_seconds"] for d in done]
        total_wall += sum(walls)
        runs = sorted({d["epochs_run"] for d in done})
        recs = sorted({d["recipe_epochs"] for d in done})
        ep = "/".join(str(e) for e in runs) + " of " + "/".join(str(e) for e in recs)
        if len(recs) > 1 or len({json.dumps(d["config"] | {"seed": 0}, sort_keys=True) for d in done}) > 1:
            notes.append(f"{size} {model} {task} {rec}: the seeds ran with different configs (recipe re-tuned "
                         "during the run)")
        best = "/".join(str(d["best_epoch"]) for d in done)
        sel = "video_accuracy" if task == "weak" else "accuracy"
        val = _ms([d["val"][sel] for d in done])
        seg = _ms([d["test"]["accuracy"] for d in done])
        vid = _ms([d["test"]["video_accuracy"] for d in done]) if task == "weak" else "—"
        major = rates.get(size, {}).get("test", {}).get("majority_segment_rate")
        # A trivial rule's rate, when every seed sits on it (nearer to it than to the other rule).
        if major is not None:
            for rate, what in ((major, "majority rate"), (1 - major, "event-everywhere rate")):
                other = 1 - rate
                if all(abs(d["test"]["accuracy"] - rate) < 1e-3 < abs(d["test"]["accuracy"] - other)
                       for d in done):
                    seg += f" ({what})"
        seeds_note = "" if not missing else f" ({len(done)} of {len(group)} seeds: {'; '.join(missing)})"
        wall = f"{np.mean(walls):.0f} ({', '.join(f'{w:.0f}' for w in walls)})"
        lines.append(f"| {task} | {label} | {rec} | {ep} | {best} | {val} | {seg}{seeds_note} | "
                     f"{vid} | {wall} |")
    head = [
        f"Reproduce: `{argv_hint}` (resumable; `--markdown` prints this table).",
        "",
        f"`avel data synth` data, 6 classes; each run selects its checkpoint on validation (segment accuracy "
        f"supervised, video accuracy weak); figures are mean ± std (ddof 1) over seeds "
        f"{', '.join(map(str, SEEDS))}; one thread per run, one run at a time. "
        "\"epochs run (of recipe)\": a run capped with `--set epochs=N` reads \"N of R\". "
        f"{n_done} runs, {total_wall / 60:.1f} min of run wall time in all.",
        "",
    ]
    tail = ["", f"Not in the plan (budget): at the AVE size only `{AVE_RECIPE}` runs, {AVE_CAP} epochs for every model, "
            "and " + ", ".join(f"`{m}`" for m in AVE_LEFT_OUT) + " not at all "
            f"({len(left_out())} (model, task, recipe) groups left out there)."]
    sessions = json.loads((out / "sessions.json").read_text()) if (out / "sessions.json").is_file() else []
    if sessions:
        tail += ["", "Table runs (wall time of the whole command, data generation included): " + "; ".join(
            f"{x['started']} `{x['argv']}` {x.get('wall_minutes', '?')} min, {x.get('cells_run', '?')} cells"
            for x in sessions) + "."]
    if failures:
        tail += ["", "Failures:"] + [f"- {f['cell']}: {f['error'].strip().splitlines()[-1]}" for f in failures]
    if notes:
        tail += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(head + lines + tail) + "\n"


# --- main ---------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/work/results/table"),
                    help="output folder: data/, cells/ (one JSON per finished run), runs/")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="print the table of the finished cells")
    mode.add_argument("--plan", action="store_true", help="print the cells, their state and estimated seconds")
    mode.add_argument("--measure", action="store_true", help="time one epoch of every model at each size")
    ap.add_argument("--sizes", default="400,ave", help="sizes to measure (--measure)")
    ap.add_argument("--recipes", choices=["both", "home", "modern"], default="both",
                    help="recipes to measure (--measure); a recipe not measured at a size is estimated "
                         "from the other one, scaled as at 400 videos")
    ap.add_argument("--stop-after", type=float, default=0.0,
                    help="start no new cell after this many minutes (0 = no limit); unstarted cells stay to do")
    ap.add_argument("--retry-failed", action="store_true", help="rerun cells that failed before")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    hint = f"python scripts/results_table.py --out {out}"
    if (out / "sessions.json").is_file():
        hint = json.loads((out / "sessions.json").read_text())[-1]["argv"]

    import torch

    torch.set_num_threads(1)
    if args.markdown:
        print(markdown(out, hint), end="")
        return 0
    if args.measure:
        measure(out, [s for s in args.sizes.split(",") if s], args.recipes)
        return 0
    cells = plan()
    meas = load_measure(out)
    if args.plan:
        total = 0.0
        for c in cells:
            state, _ = cell_state(out, c)
            est = estimate(c, meas)
            total += (est or 0.0) if state != "done" else 0.0
            cap = f"cap {c.cap}" if c.cap else "full"
            print(f"{c.name:55s} {state:6s} {cap:8s} {'' if est is None else f'{est:7.0f} s'}")
        print(f"estimated seconds still to run: {total:.0f} ({total / 60:.1f} min)")
        return 0
    t_start = time.perf_counter()
    sessions_path = out / "sessions.json"
    sessions = json.loads(sessions_path.read_text()) if sessions_path.is_file() else []
    session = {"started": datetime.now().astimezone().isoformat(timespec="seconds"),
               "argv": " ".join(["python", "scripts/results_table.py", *sys.argv[1:]]), "code": code_version()}
    sessions.append(session)
    write_json(sessions_path, sessions)
    n_run = 0
    for size in sorted({c.size for c in cells}, key=list(SIZES).index):
        ensure_data(out, size)
        write_json(data_root(out, size) / ".majority.json", majority_rate(data_root(out, size)))
    todo = []
    for c in cells:
        state, _ = cell_state(out, c)
        if state == "done" or (state == "failed" and not args.retry_failed):
            continue
        todo.append(c)
    log(f"{len(cells)} cells in the plan, {len(todo)} to run")
    for i, c in enumerate(todo, 1):
        elapsed = (time.perf_counter() - t_start) / 60
        if args.stop_after and elapsed > args.stop_after:
            log(f"--stop-after {args.stop_after:g} min reached: {len(todo) - i + 1} cells left to run")
            break
        est = estimate(c, meas)
        log(f"[{i}/{len(todo)}] {c.name} ({'cap ' + str(c.cap) if c.cap else 'full recipe'}"
            f"{'' if est is None else f', ~{est:.0f} s'})")
        cell_path(out, c, failed=True).unlink(missing_ok=True)
        try:
            rec = run_cell(c, out)
        except Exception:                              # noqa: BLE001 - a model's bug: report it, go on
            tb = traceback.format_exc()
            log(f"FAILED {c.name}\n{tb}")
            try:
                config = cell_config(c, data_root(out, c.size))[0].to_dict()
            except Exception:                          # noqa: BLE001 - the recipe itself does not resolve
                config = None
            write_json(cell_path(out, c, failed=True), {"cell": c.name, "error": tb, "config": config,
                                                        "code": code_version()})
            continue
        cell_path(out, c).parent.mkdir(parents=True, exist_ok=True)
        write_json(cell_path(out, c), rec)
        n_run += 1
        session.update(wall_minutes=round((time.perf_counter() - t_start) / 60, 1), cells_run=n_run)
        write_json(sessions_path, sessions)
        extra = f", video {rec['test']['video_accuracy']:.3f}" if c.task == "weak" else ""
        log(f"    done in {rec['wall_seconds']:.0f} s: {rec['epochs_run']} of {rec['recipe_epochs']} epochs, "
            f"best epoch {rec['best_epoch']}, test segment {rec['test']['accuracy']:.3f}{extra}")
    session.update(wall_minutes=round((time.perf_counter() - t_start) / 60, 1), cells_run=n_run, finished=True)
    write_json(sessions_path, sessions)
    log(f"finished in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
