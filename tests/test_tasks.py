"""Task losses: the 2018 loss, cross-entropy, and the loss-term hook."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import avel
from _coredata import TINY_MODEL, quick_config, read_jsonl, synth
from avel import metrics
from avel.config import ConfigError, RunConfig, apply_overrides, recipe, resolve_run_config
from avel.data.datasets import AVEData
from avel.engine import checkpoint
from avel.engine.evaluate import evaluate
from avel.engine.train import train
from avel.tasks import SupervisedTask, build_task, segment_losses


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("engine") / "ave", videos=60, background_videos=0)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_softmax_mlsm_is_multilabel_soft_margin_on_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, 29, generator=g) * 3
    target = torch.nn.functional.one_hot(torch.randint(0, 29, (4, 10), generator=g), 29).float()
    reference = torch.nn.MultiLabelSoftMarginLoss()(logits.softmax(-1), target)
    per_video = segment_losses(logits, target, "softmax_mlsm")
    assert per_video.shape == (4,)
    torch.testing.assert_close(per_video.mean(), reference)
    # The average over all elements, by hand.
    p = logits.softmax(-1)
    by_hand = -(target * torch.nn.functional.logsigmoid(p) + (1 - target) * torch.nn.functional.logsigmoid(-p)).mean()
    torch.testing.assert_close(per_video.mean(), by_hand)
    # Video-level (weak) shape [B, C] too.
    torch.testing.assert_close(segment_losses(logits[:, 0], target[:, 0], "softmax_mlsm").mean(),
                               torch.nn.MultiLabelSoftMarginLoss()(logits[:, 0].softmax(-1), target[:, 0]))
    # ce is cross-entropy on logits against the argmax of the one-hot.
    torch.testing.assert_close(segment_losses(logits, target, "ce").mean(),
                               torch.nn.functional.cross_entropy(logits.reshape(-1, 29), target.reshape(-1, 29).argmax(-1)))
    with pytest.raises(ValueError):
        segment_losses(logits, target, "hinge")

