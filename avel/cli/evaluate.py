"""``avel evaluate``: score a checkpoint on one split (all checking lives in the evaluator)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.evaluate import evaluate_checkpoint
from .args import Groups

TEXT_KEYS = ("accuracy", "video_accuracy", "event_f1", "a2v_accuracy", "v2a_accuracy", "a2v_coverage",
             "v2a_coverage", "chance_accuracy", "evaluated_videos", "segments", "videos")


def add(sub, g: Groups) -> None:
    p = sub.add_parser("evaluate", parents=[g.common, g.data, g.checkpoint, g.json], help="score a checkpoint on a split")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--predictions", type=Path, help="also write per-row predictions to this .npz")
    p.set_defaults(func=run)


def run(args) -> int:
    metrics, predictions = evaluate_checkpoint(args.checkpoint, args.data_root, split=args.split, layout=args.layout,
                                               batch_size=args.batch_size, device=args.device)
    if args.predictions:
        np.savez(args.predictions, **predictions)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key in TEXT_KEYS:
            if key in metrics:
                print(f"{key}: {metrics[key]}")
    return 0
