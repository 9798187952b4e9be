"""``avel convert-original``: an official AVE checkpoint (PyTorch or Keras) -> an avel checkpoint folder."""
from __future__ import annotations

from pathlib import Path

from .. import compat
from ..engine import checkpoint
from .args import Groups


def add(sub, g: Groups) -> None:
    p = sub.add_parser("convert-original", parents=[g.common],
                       help="official AV_att.pt / AV_att_weak.pt / DMRN.pt or cmm_model_weights.h5 -> avel checkpoint")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.set_defaults(func=run)


def run(args) -> int:
    model, card = compat.convert_original(args.src)
    checkpoint.save(args.dst, model, card)
    print(f"wrote {args.dst} ({card.model}, {card.task} task, from {args.src.name})")
    return 0
