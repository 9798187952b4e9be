"""The one training loop: determinism, resume after kills, selection on validation, run lock."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import avel
from avel.config import apply_overrides
from avel.data.datasets import AVEData
from avel.data.errors import DataError
from avel.engine import checkpoint
from avel.engine.evaluate import evaluate
from avel.engine.train import train
from avel.tasks import build_task

from _coredata import TINY_MODEL, quick_config, read_jsonl, same_weights, small_folder, weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return small_folder(tmp_path_factory)


def test_deterministic_training(tmp_path, data_root):
    cfg = quick_config(data_root, epochs=3, shuffle=True)
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    train(replace(cfg, seed=1), tmp_path / "c", progress=False)
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert read_jsonl(tmp_path / "a" / "metrics.jsonl") == read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "c"))


class Killed(Exception):
    pass


@pytest.mark.parametrize("recipe_name", ["original", "modern"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, data_root, recipe_name):
    cfg = quick_config(data_root, recipe_name=recipe_name, epochs=5, eval_every=2, shuffle=True)
    full = train(cfg, tmp_path / "full", progress=False)

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", progress=False, callbacks=[kill_after_two])
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
    resumed = train(cfg, tmp_path / "run", progress=False, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert same_weights(weights(tmp_path / "run"), weights(tmp_path / "full"))
    last_a = load_file(str(tmp_path / "run" / "last" / "state.safetensors"))
    last_b = load_file(str(tmp_path / "full" / "last" / "state.safetensors"))
    assert same_weights(last_a, last_b)                       # final weights and optimizer moments
    assert (resumed.best_epoch, resumed.best_score) == (full.best_epoch, full.best_score)
    # Resuming with another config is refused.
    with pytest.raises(ValueError, match="another config"):
        train(replace(cfg, seed=9), tmp_path / "run", progress=False, resume=True)


def test_resume_after_a_kill_between_log_and_state(tmp_path, data_root):
    """A kill after metrics.jsonl got an epoch's line but before last/ was saved: no duplicate line."""
    cfg = quick_config(data_root, epochs=3, eval_every=1)
    train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "run", progress=False,
              callbacks=[lambda r: (_ for _ in ()).throw(Killed) if r["epoch"] == 1 else None])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:       # epoch 2 logged, then the kill
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n")
    train(cfg, tmp_path / "run", progress=False, resume=True)
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(tmp_path / "full" / "metrics.jsonl")


def test_fresh_run_in_used_folder_starts_a_new_log(tmp_path, data_root):
    cfg = quick_config(data_root, epochs=2)
    train(cfg, tmp_path / "r", progress=False)
    train(replace(cfg, epochs=3), tmp_path / "r", progress=False)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1, 2, 3]


def test_best_on_validation_and_test_split_untouched(tmp_path, data_root, monkeypatch):
    root = shutil.copytree(data_root, tmp_path / "ave")
    for name in ("test_order.h5", "test_order_match.h5"):
        (root / name).write_bytes(b"\x00garbage, not hdf5\xff" * 10)
    asked = []
    real_split = AVEData.split

    def spy(self, name, **kw):
        asked.append(name)
        return real_split(self, name, **kw)

    monkeypatch.setattr(AVEData, "split", spy)
    cfg = quick_config(root, epochs=6, eval_every=1, loss="ce", model="av", model_kwargs={"hidden": 8, "head_hidden": 8})
    cfg = apply_overrides(cfg, ["optim.lr=1e-2"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert "test" not in asked and "val" in asked
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    scores = [r["val"]["accuracy"] for r in records]
    assert len(scores) == 6
    assert len(set(scores)) > 1 and scores[-1] < max(scores)   # the choice matters here
    card = checkpoint.read_card(tmp_path / "run")
    saved = card.training
    assert saved["epoch"] == result.best_epoch and saved["selection_split"] == "val"
    assert scores[saved["epoch"] - 1] == max(scores)           # the checkpoint has the best val score
    # Ties keep the later (longer-trained) weights: the last epoch with the max.
    assert saved["epoch"] == len(scores) - scores[::-1].index(max(scores))
    assert saved["selection"] == "accuracy"
    assert saved["selection_score"] == pytest.approx(max(scores)) == pytest.approx(result.best_score)
    assert [r["improved"] for r in records] == [s >= max(scores[:i], default=-1) for i, s in enumerate(scores)]
    assert max(i for i, r in enumerate(records, 1) if r["improved"]) == saved["epoch"]
    # The saved weights are those of that epoch: re-scoring val gives the recorded metrics.
    model, _ = avel.load(tmp_path / "run")
    data = AVEData.open(root)
    task = build_task(cfg)
    val, _ = evaluate(model, task, task.eval_source(data, "val"), data.class_names)
    assert val["accuracy"] == pytest.approx(saved["val_metrics"]["accuracy"])
    with pytest.raises(DataError):
        real_split(data, "test")                                # it really is unreadable



def test_loss_terms_are_logged(tmp_path, data_root):
    train(quick_config(data_root, epochs=2), tmp_path / "run", progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(set(r["loss_terms"]) == {"segment"} for r in records)
    assert all(r["loss_terms"]["segment"] == pytest.approx(r["train_loss"]) for r in records)


def test_second_writer_on_the_same_out_is_refused(tmp_path, data_root):
    from avel.io import FolderBusyError, FolderLock

    with FolderLock(tmp_path / "run"):                      # another live run holds the folder
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
            train(quick_config(data_root, epochs=1), tmp_path / "run", progress=False)
    train(quick_config(data_root, epochs=1), tmp_path / "run", progress=False)   # free again


def test_stale_temporaries_are_removed_on_start(tmp_path, data_root):
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"x" * 1000)
    (run / "last" / ".state.safetensors.zz.tmp").write_bytes(b"x")
    train(quick_config(data_root, epochs=1), run, progress=False)
    assert not list(run.rglob("*.tmp"))


def test_model_kwargs_may_not_contradict_the_data(tmp_path, data_root):
    with pytest.raises(ValueError, match="visual_dim=99 but the data has 16"):
        train(quick_config(data_root, epochs=1, model_kwargs={**TINY_MODEL, "visual_dim": 99}), tmp_path / "r",
              progress=False)
    # The same value as the data is harmless.
    train(quick_config(data_root, epochs=1, model_kwargs={**TINY_MODEL, "visual_dim": 16, "grid": [3, 3]}),
          tmp_path / "ok", progress=False)


def test_bad_device_and_out_are_refused(tmp_path, data_root):
    with pytest.raises(ValueError, match="not a torch device"):
        train(quick_config(data_root, epochs=1), tmp_path / "r", progress=False, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(quick_config(data_root, epochs=1), tmp_path / "r", progress=False, device="cuda")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(quick_config(data_root, epochs=1), tmp_path / "file", progress=False)


@pytest.mark.parametrize("kill_at", range(6))
def test_kill_between_any_two_file_operations_of_a_save_resumes_bit_identically(tmp_path, data_root, kill_at,
                                                                               monkeypatch):
    """Kill the run at the k-th file operation (temp write, fsync'd rename) of its epoch-2 saves."""
    import avel.io as avel_io

    cfg = quick_config(data_root, epochs=3, eval_every=1, shuffle=True)
    train(cfg, tmp_path / "full", progress=False)
    real_replace = os.replace
    ops = {"n": 0, "armed": False}

    def replace_and_maybe_die(src, dst):
        if ops["armed"]:
            if ops["n"] == kill_at:
                raise Killed                     # the process dies before this rename
            ops["n"] += 1
        return real_replace(src, dst)

    def arm(record):
        ops["armed"] = record["epoch"] == 1      # the saves at the end of epoch 2 are the ones killed

    monkeypatch.setattr(avel_io.os, "replace", replace_and_maybe_die)
    try:
        train(cfg, tmp_path / "run", progress=False, callbacks=[arm])
        killed = False
    except Killed:
        killed = True
    monkeypatch.setattr(avel_io.os, "replace", real_replace)
    assert killed or kill_at >= ops["n"]
    assert killed or kill_at > 0                  # the first rename of the epoch-2 saves is always reached
    train(cfg, tmp_path / "run", progress=False, resume=True)
    assert same_weights(weights(tmp_path / "run"), weights(tmp_path / "full"))
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == read_jsonl(tmp_path / "full" / "metrics.jsonl")
    a = load_file(str(tmp_path / "run" / "last" / "state.safetensors"))
    b = load_file(str(tmp_path / "full" / "last" / "state.safetensors"))
    assert same_weights(a, b)
    assert checkpoint.read_card(tmp_path / "run") == checkpoint.read_card(tmp_path / "full")
