"""``avel demo``: the built-in end-to-end run, its stages and result printed as it goes."""
from __future__ import annotations

from pathlib import Path

from .._version import __version__
from ..demo import CLASSES, SIZES, run_demo
from .args import Groups


def add(sub, g: Groups) -> None:
    p = sub.add_parser("demo", parents=[g.common, g.progress],
                       help="built-in end-to-end run: clips -> features -> train -> report")
    p.add_argument("--out", type=Path, default=Path("avel-demo"), help="output folder (default: ./avel-demo)")
    p.add_argument("--size", choices=list(SIZES), default="full", help="'small' is a quick smoke run")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args) -> int:
    cfg = SIZES[args.size]
    clips = cfg.train + cfg.val + cfg.test
    _say(f"avel {__version__} demo ({args.size}): {clips} clips of {cfg.seconds} s, {len(CLASSES)} classes "
         f"({', '.join(CLASSES)}) + background -> {args.out}")
    r = run_demo(args.out, size=args.size, device=args.device, progress=not args.no_progress, notify=_say)
    print(f"\ntest segment accuracy: {r.accuracy:.3f}  (majority-class rate {r.majority_rate:.3f}: "
          f"'{r.majority_class}' everywhere; {r.segments} segments of {len(r.clips)} held-out clips)")
    print(f"total time: {r.seconds['total']:.1f} s")
    print(f"report: {r.report}")
    print(f"next:   avel train --data-root {r.data_root} --model av_att --recipe modern --out my-run\n"
          f"        avel localize {r.clips[0]} --checkpoint {r.checkpoint} --report")
    return 0
