"""The ``avel`` command: one parser, subcommands, shared options declared once."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("avel")


# --- shared option groups (declared once, attached where needed) --------------------------------

def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    return p


def _data() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data-root", required=True, type=Path, help="AVE-layout folder (official release or avel-made)")
    p.add_argument("--layout", choices=["auto", "h5", "packed"], default="auto",
                   help="feature files to read: packed when present (auto), the h5 files, or packed only")
    return p


def _checkpoint() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--checkpoint", required=True, type=Path, help="run folder or checkpoint folder")
    return p


def _json() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common, data, ckpt, js = _common(), _data(), _checkpoint(), _json()
    parser = argparse.ArgumentParser(prog="avel", description="Audio-visual event localization (AVE) toolkit")
    parser.add_argument("--version", action="version", version=f"avel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="built-in end-to-end run: clips -> features -> train -> report")
    p.add_argument("--out", type=Path, default=Path("avel-demo"), help="output folder (default: ./avel-demo)")
    p.add_argument("--size", choices=["small", "full"], default="full", help="'small' is a quick smoke run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", parents=[common, data], help="train a model (any task, any registered model)")
    p.add_argument("--model", help="registered model name (see `avel models`)")
    p.add_argument("--task", choices=["supervised", "weak", "cml"], default="supervised")
    p.add_argument("--recipe", choices=["original", "modern"], default="original")
    p.add_argument("--config", type=Path, help="YAML run config (overrides the recipe)")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common, data, ckpt, js], help="score a checkpoint on a split")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--predictions", type=Path, help="also write per-row predictions to this .npz")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", parents=[common], help="list registered models and their arguments")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert-original", parents=[common],
                       help="official AV_att.pt / AV_att_weak.pt / DMRN.pt or cmm_model_weights.h5 -> avel checkpoint")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.set_defaults(func=cmd_convert)

    dp = sub.add_parser("data", help="dataset tools: check, synth, pack")
    dsub = dp.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("check", parents=[common, js], help="integrity report of an AVE folder")
    p.add_argument("root", type=Path)
    p.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan of feature values")
    p.set_defaults(func=cmd_data_check)
    p = dsub.add_parser("synth", parents=[common], help="write an AVE-format synthetic dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--videos", type=int, default=400)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--visual-dim", type=int, default=128)
    p.add_argument("--audio-dim", type=int, default=128)
    p.add_argument("--background-videos", type=int, default=200,
                   help="background-only videos for the weak task (*_noisy.h5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)
    p = dsub.add_parser("pack", parents=[common], help="write the packed memory-mapped layout next to the h5 files")
    p.add_argument("root", type=Path)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.set_defaults(func=cmd_data_pack)

    _add_feature_commands(sub, common, ckpt, js)
    return parser


def _add_feature_commands(sub, common, ckpt, js) -> None:
    """extract / localize / visualize: media in, features or reports out."""
    p = sub.add_parser("extract", parents=[common],
                       help="videos -> feature store (official h5 layout); `avel extract merge OUT` joins shards")
    p.add_argument("inputs", nargs="+", help="video folder, file list, Annotations.txt, or video files")
    p.add_argument("--out", type=Path, help="feature folder to write")
    p.add_argument("--video-dir", type=Path, help="where the videos named by an Annotations.txt are")
    p.add_argument("--audio", default="logmel", help="audio backbone: logmel (offline default) | vggish")
    p.add_argument("--visual", default="efficientnet-lite0",
                   help="visual backbone: efficientnet-lite0 (offline default) | vgg19-pool5")
    p.add_argument("--audio-weights", help="weights file for the audio backbone ('random' only if you mean it)")
    p.add_argument("--visual-weights", help="weights file for the visual backbone ('random' only if you mean it)")
    p.add_argument("--visual-size", type=int, help="frame size for efficientnet-lite0 (default 224: a 7x7 grid)")
    p.add_argument("--seconds", type=int, default=10, help="segments per video in the store (AVE: 10)")
    p.add_argument("--fps", type=int, default=16, help="frames per second averaged per segment (AVE: 16)")
    p.add_argument("--batch-frames", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="parallel decoding threads")
    p.add_argument("--num-shards", type=int)
    p.add_argument("--shard-index", type=int)
    p.add_argument("--retry-failed", action="store_true", help="on resume, try again the videos that failed")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-video parts after the store is written")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("localize", parents=[common, ckpt], help="per-second events in your own videos")
    p.add_argument("videos", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("avel-localize"))
    p.add_argument("--format", choices=["json", "csv"], default="json")
    p.add_argument("--report", action="store_true", help="also write a self-contained HTML report")
    p.add_argument("--audio-weights")
    p.add_argument("--visual-weights")
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("visualize", parents=[common, ckpt], help="audio-guided attention drawn over the frames")
    p.add_argument("video", type=Path)
    p.add_argument("--out", type=Path, default=Path("avel-attention"))
    p.add_argument("--mp4", action="store_true", help="also write an mp4 with the overlay")
    p.add_argument("--audio-weights")
    p.add_argument("--visual-weights")
    p.set_defaults(func=cmd_visualize)


# --- commands ------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .config import DataConfig, RunConfig, apply_overrides, recipe
    from .engine.train import train, train_seeds

    config = RunConfig.from_yaml(args.config) if args.config else recipe(args.recipe, args.task)
    data = replace(config.data, root=str(args.data_root), layout=args.layout,
                   background=tuple(str(b) for b in args.background) or config.data.background,
                   official_background=config.data.official_background and not args.no_official_background)
    config = replace(config, data=data)
    for key, value in (("model", args.model), ("epochs", args.epochs), ("batch_size", args.batch_size),
                       ("seed", args.seed), ("selection", args.selection)):
        if value is not None:
            config = replace(config, **{key: value})
    config = apply_overrides(config, args.overrides)
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        summary = train_seeds(config, args.out, seeds, device=args.device, progress=not args.no_progress,
                              resume=args.resume)
        print(_seed_table(summary))
        return 0
    result = train(config, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
    print(f"best {result.selection_key} on {config.data.val_split}: {result.best_score:.4f} "
          f"(epoch {result.best_epoch}); checkpoint: {result.out_dir}")
    return 0


def _seed_table(summary: dict) -> str:
    lines = [f"seeds {summary['seeds']}: mean ± std"]
    for split, means in summary["mean"].items():
        keys = [k for k in ("accuracy", "video_accuracy", "a2v_accuracy", "v2a_accuracy") if k in means]
        lines.append(f"  {split}: " + ", ".join(f"{k} {means[k]:.4f} ± {summary['std'][split][k]:.4f}" for k in keys))
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    import numpy as np

    from . import load
    from .config import RunConfig
    from .data.datasets import AVEData
    from .data.errors import DataError
    from .engine.evaluate import evaluate
    from .spec import FeatureSpec
    from .tasks import build_task

    model = load(args.checkpoint, map_location=args.device)
    cfg = model.avel_config
    data = AVEData.open(args.data_root, layout=args.layout)
    if "feature_spec" in cfg:
        problems = data.store.spec.compatible_with(FeatureSpec.from_dict(cfg["feature_spec"]))
        if problems:
            raise DataError(f"{args.data_root}: features do not match checkpoint {args.checkpoint}: " + "; ".join(problems))
    run = RunConfig.from_dict(cfg["run_config"]) if "run_config" in cfg else RunConfig(task=cfg.get("task", "supervised"))
    if run.task != "cml" and cfg.get("class_names") and list(cfg["class_names"]) != data.class_names:
        # Scores are class indices: another class list would be scored silently wrong.
        raise DataError(f"{args.data_root}: classes {data.class_names} differ from checkpoint {args.checkpoint}'s "
                        f"{cfg['class_names']}")
    task = build_task(run)
    metrics, out = evaluate(model, task, task.eval_source(data, args.split), data.class_names,
                            batch_size=args.batch_size, device=args.device)
    metrics = {"split": args.split, "checkpoint": str(args.checkpoint), "task": run.task, **metrics}
    if args.predictions:
        np.savez(args.predictions, **out)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key in ("accuracy", "video_accuracy", "event_f1", "a2v_accuracy", "v2a_accuracy", "a2v_coverage",
                    "v2a_coverage", "chance_accuracy", "evaluated_videos", "segments", "videos"):
            if key in metrics:
                print(f"{key}: {metrics[key]}")
    return 0


def cmd_models(args) -> int:
    from .models import available_models, model_arguments

    for name in available_models():
        kwargs = ", ".join(f"{k}={v!r}" for k, v in model_arguments(name).items())
        print(f"{name}: {kwargs}")
    return 0


def cmd_convert(args) -> int:
    from .compat import load_keras_cml, load_original
    from .engine import checkpoint

    if args.src.suffix == ".h5":
        model, info = load_keras_cml(args.src), {"task": "cml", "source": "official keras cross-modal weights"}
    else:
        model = load_original(args.src)
        kind = getattr(model, "original_kind", "av_att")
        info = {"task": "weak" if kind == "av_att_weak" else "supervised", "source": f"official {kind}"}
    from .spec import AVE_OFFICIAL

    names = _ave_class_names()
    checkpoint.save(args.dst, model, **info, feature_spec=AVE_OFFICIAL.to_dict(), class_names=names,
                    converted_from=str(args.src))
    print(f"wrote {args.dst} ({info['source']})")
    return 0


def _ave_class_names() -> list[str]:
    from importlib.resources import files

    text = files("avel").joinpath("resources/ave_categories.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()] + ["background"]


def cmd_data_check(args) -> int:
    from .data.checks import check_folder

    report = check_folder(args.root, scan_values=not args.no_scan)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if not report.problems else 1


def cmd_data_synth(args) -> int:
    from .data.synth import SynthConfig, generate

    out = generate(args.out, SynthConfig(videos=args.videos, classes=args.classes, visual_dim=args.visual_dim,
                                         audio_dim=args.audio_dim, background_videos=args.background_videos,
                                         seed=args.seed))
    print(f"wrote synthetic AVE folder {out}")
    return 0


def cmd_data_pack(args) -> int:
    from .data.store import pack

    out = pack(args.root, dtype=args.dtype, progress=lambda name, done, total: log.info("%s %d/%d", name, done, total))
    print(f"packed layout at {out}")
    return 0


def cmd_extract(args) -> int:
    from .features.extract import run_extract, run_merge

    if args.inputs[0] == "merge":
        if len(args.inputs) != 2:
            raise SystemExit("usage: avel extract merge OUT")
        print(run_merge(args.inputs[1]))
        return 0
    if args.out is None:
        raise SystemExit("avel extract: --out is required")
    result = run_extract(args.inputs, str(args.out), video_dir=args.video_dir, audio=args.audio, visual=args.visual,
                         audio_weights=args.audio_weights, visual_weights=args.visual_weights, seconds=args.seconds,
                         fps=args.fps, batch_frames=args.batch_frames, workers=args.workers,
                         num_shards=args.num_shards, shard_index=args.shard_index, device=args.device,
                         progress=not args.no_progress, keep_parts=args.keep_parts, retry_failed=args.retry_failed,
                         visual_size=args.visual_size)
    print(result)
    return 0


def cmd_localize(args) -> int:
    from .localize import run_localize

    return run_localize(args.videos, checkpoint=args.checkpoint, out=args.out, fmt=args.format, report=args.report,
                        device=args.device, audio_weights=args.audio_weights, visual_weights=args.visual_weights)


def cmd_visualize(args) -> int:
    from .viz.attention import run_visualize

    return run_visualize(args.video, checkpoint=args.checkpoint, out=args.out, mp4=args.mp4, device=args.device,
                         audio_weights=args.audio_weights, visual_weights=args.visual_weights)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, size=args.size, device=args.device, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(2, getattr(args, "verbose", 0))   # -v: INFO, -vv: DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from .data.errors import DataError

    try:
        return int(args.func(args) or 0)
    except (DataError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"avel {args.command}: error: {e}", file=sys.stderr)
        if getattr(args, "verbose", 0) > 1:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
