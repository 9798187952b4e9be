"""``avel train``: a recipe (or a config file), flags and ``--set`` -> one run config -> the one loop."""
from __future__ import annotations

from pathlib import Path

from ..config import DEFAULT_RECIPE, TASKS, available_recipes, resolve_run_config
from ..engine import train as trainer
from ..models import model_class
from .args import Groups


def add(sub, g: Groups) -> None:
    p = sub.add_parser("train", parents=[g.common, g.data, g.progress],
                       help="train a model (any task, any registered model)")
    p.add_argument("--model", help="registered model name (see `avel models`)")
    p.add_argument("--task", choices=list(TASKS), help="supervised (default), weak or cml")
    p.add_argument("--recipe", choices=available_recipes(),
                   help=f"training recipe (default: {DEFAULT_RECIPE}, the recommended one; original = the 2018 code)")
    p.add_argument("--config", type=Path, help="YAML run config, instead of a recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", help="comma-separated seeds: one run each, then mean ± std per split")
    p.add_argument("--selection", choices=["video", "segment"],
                   help="weak task model selection: validation video accuracy (default, weak labels only) "
                        "or segment accuracy (the original protocol, peeks at strong labels)")
    p.add_argument("--background", action="append", default=[], type=Path, metavar="DIR",
                   help="extra background-only feature folder for the weak task (repeatable)")
    p.add_argument("--no-official-background", action="store_true",
                   help="weak task: do not add the *_noisy.h5 background videos of the data root")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, metrics.jsonl, last/)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from OUT/last")
    p.set_defaults(func=run)


def run(args) -> int:
    task = args.task
    if task is None and args.model is not None and args.config is None:
        task = model_class(args.model).tasks[0] if hasattr(model_class(args.model), "tasks") else None
    config = resolve_run_config(
        config_file=args.config, recipe_name=args.recipe, task=task, model=args.model,
        overrides=args.overrides, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        selection=args.selection, background=args.background or None,
        official_background=False if args.no_official_background else None,
        data_root=args.data_root, layout=args.layout)
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        summary = trainer.train_seeds(config, args.out, seeds, device=args.device, progress=not args.no_progress,
                                      resume=args.resume)
        print(seed_table(summary))
        return 0
    result = trainer.train(config, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
    print(f"best {result.selection_key} on {config.data.val_split}: {result.best_score:.4f} "
          f"(epoch {result.best_epoch}); checkpoint: {result.out_dir}")
    return 0


def seed_table(summary: dict) -> str:
    lines = [f"seeds {summary['seeds']}: mean ± std"]
    for split, means in summary["mean"].items():
        keys = [k for k in ("accuracy", "video_accuracy", "a2v_accuracy", "v2a_accuracy") if k in means]
        lines.append(f"  {split}: " + ", ".join(f"{k} {means[k]:.4f} ± {summary['std'][split][k]:.4f}" for k in keys))
    return "\n".join(lines)
