"""``avel models``: the registered models and their constructor arguments."""
from __future__ import annotations

from ..models import available_models, model_arguments
from .args import Groups


def add(sub, g: Groups) -> None:
    p = sub.add_parser("models", parents=[g.common], help="list registered models and their arguments")
    p.set_defaults(func=run)


def run(args) -> int:
    for name in available_models():
        kwargs = ", ".join(f"{k}={v!r}" for k, v in model_arguments(name).items())
        print(f"{name}: {kwargs}")
    return 0
