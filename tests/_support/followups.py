"""Helpers shared by the follow-up models' fixture tests (PSP, CPSP, AVSDN, CMRAN, CMBS)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """A DataParallel state dict without its ``module.`` prefix (every key must carry it)."""
    assert all(k.startswith(prefix) for k in state)
    return {k[len(prefix):]: v for k, v in state.items()}


def forward_recording(model, audio, visual, names: Iterable[str],
                      record: Callable[[str, tuple, object], None]):
    """``model(audio, visual)`` without gradients, calling ``record(name, args, output)`` for every named
    sub-module as it runs (the hooks return None: outputs are left as they are); hooks removed after."""
    def hook(name):
        def fn(module, args, output) -> None:           # None: the module's output is left as it is
            record(name, args, output)
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            return model(audio, visual)
    finally:
        for h in handles:
            h.remove()


def eval_loss_before_and_after_training(model, total: Callable[[], torch.Tensor], *, steps: int = 30,
                                        lr: float = 3e-3) -> tuple[float, float]:
    """The eval-mode loss before and after ``steps`` Adam steps in training mode.

    Dropout makes the training-mode loss noisy (and PSP's AVPS term jumps where a cosine crosses 0), so
    the comparison is of the same deterministic function before and after training.
    """
    model.eval()
    with torch.no_grad():
        start = total().item()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = total()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return start, total().item()


def assert_convert_refuses(cls, state: dict, *, missing: str, wrong: tuple[str, torch.Tensor],
                           extra: tuple[str, torch.Tensor]) -> None:
    """``cls.convert_reference`` refuses a missing key, a wrong shape and an unexpected key, naming each."""
    cases = [({k: v for k, v in state.items() if k != missing}, missing),
             ({**state, wrong[0]: wrong[1]}, wrong[0]),
             ({**state, extra[0]: extra[1]}, extra[0])]
    for broken, key in cases:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            cls.convert_reference(broken)


def load_npz(path) -> dict:
    """Every array of an .npz fixture file, read whole."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
