"""The one evaluator: run a model over a row source and score it with the task."""
from __future__ import annotations

import numpy as np
import torch

from ..data.datasets import Batches, auto_prefetch


@torch.inference_mode()
def collect(model, task, source, *, batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Predictions of ``task.predict`` over every row of ``source``, concatenated in row order."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for batch, _ in Batches(source, batch_size, shuffle=False, prefetch=auto_prefetch(device)):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for k, v in task.predict(model, batch).items():
                parts.setdefault(k, []).append(v)
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(model, task, source, class_names: list[str], *, batch_size: int = 256,
             device: str | torch.device = "cpu") -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics, raw predictions) of ``model`` on ``source``."""
    out = collect(model, task, source, batch_size=batch_size, device=device)
    return task.score(out, class_names), out
