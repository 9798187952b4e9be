"""The recommended recipe (``modern``): its schedule scales with the run, so a short run on a small
dataset learns (issue 14: a fixed 50-iteration warm-up was 8 epochs long on 360 videos)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avel.config import ConfigError, apply_overrides, recipe
from avel.data.datasets import AVEData
from avel.engine import checkpoint
from avel.engine.evaluate import evaluate
from avel.engine.train import make_optimizer, make_schedule, train
from avel.tasks import build_task, segment_losses

from _coredata import TINY_MODEL, quick_config, synth

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study_root(tmp_path_factory):
    """360 training videos, 45 val, 45 test: a small study, with small features so the test is quick."""
    return synth(tmp_path_factory.mktemp("study") / "ave", videos=450, classes=6, audio_dim=24, visual_dim=24,
                 background_videos=0)


@pytest.mark.parametrize("task", ["supervised", "weak"])
def test_modern_recipe_names_no_dataset_size(task):
    cfg = recipe("modern", task)
    o = cfg.optim
    assert o.warmup_iters == 0 and 0 < o.warmup_fraction < 0.5          # warm-up: a fraction of the run
    assert o.schedule == "cosine"                                         # decays over the run, whatever its length
    assert 0 <= o.ema_fraction <= 1
    assert cfg.loss == "ce"
    assert recipe("original", task).optim.ema_fraction == 0 and recipe("original", task).label_smoothing == 0


def test_schedule_is_the_same_shape_at_any_length():
    cfg = recipe("modern")
    p = torch.nn.Parameter(torch.zeros(1))
    shapes = []
    for total in (40, 4000):
        factor = make_schedule(make_optimizer([p], cfg), cfg, total, 6).lr_lambdas[0]
        shapes.append([factor(round(f * total) - 1) for f in (0.025, cfg.optim.warmup_fraction, 0.5, 1.0)])
    assert shapes[0] == pytest.approx(shapes[1], abs=0.05)
    assert shapes[0][1] == pytest.approx(1.0, abs=0.05) and shapes[0][-1] < 0.01


def test_six_epochs_on_360_videos_is_well_above_the_majority_rate(tmp_path, study_root):
    cfg = recipe("modern")
    cfg = replace(cfg, epochs=6, threads=1, data=replace(cfg.data, root=str(study_root)))
    run = train(cfg, tmp_path / "run", progress=False)
    data, task = AVEData.open(study_root), build_task(cfg)
    assert len(data.split("train")) == 360
    labels = data.targets[data.split("test")].argmax(-1)
    majority = np.bincount(labels.ravel()).max() / labels.size
    model, card = checkpoint.load(tmp_path / "run")
    test = evaluate(model, task, task.eval_source(data, "test"), data.class_names)[0]["accuracy"]
    assert test > majority + 0.2, (test, majority)
    # The checkpoint holds the weights that were validated (the average, when the recipe keeps one).
    val = evaluate(model, task, task.eval_source(data, "val"), data.class_names)[0]["accuracy"]
    assert val == pytest.approx(run.best_score) and card.training["selection_score"] == pytest.approx(run.best_score)


def test_weight_average_is_validated_saved_and_resumed(tmp_path):
    root = synth(tmp_path / "ave", videos=60, background_videos=0)
    cfg = quick_config(root, recipe_name="modern", epochs=4, eval_every=4, shuffle=True)   # validated once, at the end
    cfg = replace(cfg, optim=replace(cfg.optim, ema_fraction=0.3), model_kwargs=dict(TINY_MODEL))
    full = train(cfg, tmp_path / "full", progress=False)
    state = load_file(str(tmp_path / "full" / "last" / "state.safetensors"))
    averaged = {k[len("average."):]: v for k, v in state.items() if k.startswith("average.")}
    raw = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert averaged.keys() == raw.keys() and any(not torch.equal(averaged[k], raw[k]) for k in raw)
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert full.best_epoch == 4 and saved.keys() == averaged.keys()
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)       # the checkpoint is the average

    class Killed(Exception):
        pass

    def kill(record):
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", progress=False, callbacks=[kill])
    train(cfg, tmp_path / "run", progress=False, resume=True)
    a = load_file(str(tmp_path / "run" / "last" / "state.safetensors"))
    assert a.keys() == state.keys() and all(torch.equal(a[k], state[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(load_file(str(tmp_path / "run" / "model.safetensors")).values(),
                                                   load_file(str(tmp_path / "full" / "model.safetensors")).values()))


def test_label_smoothing_is_ce_only_and_changes_the_loss():
    logits, target = torch.randn(2, 10, 7), torch.nn.functional.one_hot(torch.randint(0, 7, (2, 10)), 7).float()
    assert segment_losses(logits, target, "ce", 0.0) == pytest.approx(segment_losses(logits, target, "ce"))
    assert not torch.allclose(segment_losses(logits, target, "ce", 0.1), segment_losses(logits, target, "ce"))
    with pytest.raises(ConfigError, match="label_smoothing"):
        apply_overrides(recipe("original"), ["label_smoothing=0.1"])
    for bad in ("optim.ema_fraction=1.5", "optim.ema_fraction=-0.1"):
        with pytest.raises(ConfigError, match="ema_fraction"):
            apply_overrides(recipe("modern"), [bad])
