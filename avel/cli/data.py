"""``avel data check | synth | pack``: dataset tools."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..data.checks import check_folder
from ..data.store import pack
from ..data.synth import SynthConfig, generate
from .args import Groups

log = logging.getLogger("avel")


def add(sub, g: Groups) -> None:
    dp = sub.add_parser("data", help="dataset tools: check, synth, pack")
    dsub = dp.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("check", parents=[g.common, g.json], help="integrity report of an AVE folder")
    p.add_argument("root", type=Path)
    p.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan of feature values")
    p.set_defaults(func=run_check)
    p = dsub.add_parser("synth", parents=[g.common], help="write an AVE-format synthetic dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--videos", type=int, default=400)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--visual-dim", type=int, default=128)
    p.add_argument("--audio-dim", type=int, default=128)
    p.add_argument("--background-videos", type=int, default=200,
                   help="background-only videos for the weak task (*_noisy.h5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_synth)
    p = dsub.add_parser("pack", parents=[g.common], help="write the packed memory-mapped layout next to the h5 files")
    p.add_argument("root", type=Path)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.set_defaults(func=run_pack)


def run_check(args) -> int:
    report = check_folder(args.root, scan_values=not args.no_scan)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if not report.problems else 1


def run_synth(args) -> int:
    out = generate(args.out, SynthConfig(videos=args.videos, classes=args.classes, visual_dim=args.visual_dim,
                                         audio_dim=args.audio_dim, background_videos=args.background_videos,
                                         seed=args.seed))
    print(f"wrote synthetic AVE folder {out}")
    return 0


def run_pack(args) -> int:
    out = pack(args.root, dtype=args.dtype, progress=lambda name, done, total: log.info("%s %d/%d", name, done, total))
    print(f"packed layout at {out}")
    return 0
