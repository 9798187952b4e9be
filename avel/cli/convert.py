"""``avel convert-original``: an official or reference checkpoint (PyTorch or Keras) -> an avel checkpoint folder."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import compat
from ..engine import checkpoint
from .args import Groups


def add(sub, g: Groups) -> None:
    p = sub.add_parser("convert-original", parents=[g.common],
                       help="official AV_att.pt / AV_att_weak.pt / DMRN.pt / cmm_model_weights.h5, or a follow-up "
                            "model's released file (PSP *.pt, CPSP/AVSDN/CMRAN/CMBS *.pth.tar) -> avel checkpoint")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path, help="checkpoint folder to write (model.safetensors + config.json)")
    p.add_argument("--kind", help="what the file holds: a 2018 kind (av_att, av_att_weak, dmrn) or a model name "
                                  "(psp, cmbs_weak, ...); needed only when the file does not say")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="the converted model's dtype (the follow-up files are float64; default float32)")
    p.add_argument("--task", choices=["supervised", "weak"],
                   help="task recorded in the card for a model that trains in both (avsdn); default from the kind")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.dst.exists() and not args.dst.is_dir():
        raise ValueError(f"{args.dst}: the destination is a file; give a folder for the checkpoint")
    model, card = compat.convert_original(args.src, kind=args.kind, dtype=getattr(torch, args.dtype), task=args.task)
    checkpoint.save(args.dst, model, card)
    print(f"wrote {args.dst} ({card.model}, {card.task} task, from {args.src.name})")
    return 0
