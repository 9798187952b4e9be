"""The one evaluator: run a model over a row source and score it with the task."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..card import feature_problems
from ..config import RunConfig
from ..data.datasets import AVEData, Batches, auto_prefetch
from ..data.errors import DataError
from ..tasks import build_task
from .checkpoint import load


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


def evaluate_checkpoint(checkpoint_path: str | Path, data_root: str | Path, *, split: str = "test",
                        layout: str = "auto", batch_size: int = 256,
                        device: str | torch.device = "cpu") -> tuple[dict, dict[str, np.ndarray]]:
    """Score a checkpoint folder on one split of an AVE folder: (metrics, per-row predictions).

    The features must fit the checkpoint's card (the one rule of :func:`avel.card.feature_problems`)
    and carry the same class list: scores are class indices, so another list would score wrongly.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    model, card = load(checkpoint_path, map_location=device)
    data = AVEData.open(data_root, layout=layout)
    problems = feature_problems(card, data.store.spec, audio_shape=data.store.audio.shape,
                                visual_shape=data.store.visual.shape)
    if problems:
        raise DataError(f"{data_root}: features do not fit checkpoint {checkpoint_path}: " + "; ".join(problems))
    if card.task != "cml" and card.class_names and list(card.class_names) != data.class_names:
        raise DataError(f"{data_root}: classes {data.class_names} differ from checkpoint {checkpoint_path}'s "
                        f"{list(card.class_names)}")
    run = RunConfig.from_dict(card.run_config) if card.run_config else RunConfig(task=card.task)
    task = build_task(run)
    metrics, out = evaluate(model, task, task.eval_source(data, split), data.class_names,
                            batch_size=batch_size, device=device)
    return {"split": split, "checkpoint": str(checkpoint_path), "task": card.task, "model": card.model,
            **metrics}, out
