"""Checkpoint folders: the card beside the weights, atomic writes, loading that checks before it builds."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import avel
from avel.data.datasets import AVEData
from avel.engine import checkpoint
from avel.engine.train import train
from avel.io import atomic_write

from _coredata import quick_config, same_weights, small_folder, weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return small_folder(tmp_path_factory)


def test_checkpoint_rebuilds_from_config_json_alone(tmp_path, data_root):
    cfg = replace(quick_config(data_root, epochs=1), model="dmrn", model_kwargs={"hidden": 8, "att_hidden": 8})
    train(cfg, tmp_path / "run", progress=False)
    ckpt = tmp_path / "only"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "run" / name, ckpt / name)
    info = json.loads((ckpt / "config.json").read_text())
    assert info["model"] == "dmrn" and info["model_kwargs"]["hidden"] == 8
    assert info["model_kwargs"]["grid"] == [3, 3] and info["model_kwargs"]["num_classes"] == 4
    assert info["class_names"][-1] == "background" and len(info["class_names"]) == 4
    assert info["avel_version"] == avel.__version__
    assert info["feature_spec"]["visual"]["dim"] == 16
    model, card = avel.load(ckpt)
    also, _ = avel.load(ckpt / "config.json")
    assert card.model == "dmrn" and card.outputs == ("segment_scores", "logits", "attention")
    assert not model.training
    assert same_weights(model.state_dict(), weights(ckpt)) and same_weights(also.state_dict(), weights(ckpt))
    data = AVEData.open(data_root)
    batch = data.store.read([0, 1])
    with torch.no_grad():
        out = model(torch.from_numpy(batch["audio"]), torch.from_numpy(batch["visual"]))
    assert out["segment_scores"].shape == (2, 10, 4)
    # Nothing pickled: the weights file is safetensors (JSON header), the config is JSON.
    header_len = int.from_bytes((ckpt / "model.safetensors").read_bytes()[:8], "little")
    json.loads((ckpt / "model.safetensors").read_bytes()[8:8 + header_len])
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        avel.load(ckpt)
    with pytest.raises(FileNotFoundError):
        avel.load(tmp_path / "nowhere")


def test_atomic_writes_leave_no_temp_files(tmp_path, data_root, monkeypatch):
    train(quick_config(data_root, epochs=2), tmp_path / "run", progress=False)
    names = [p.name for p in (tmp_path / "run").rglob("*")]
    assert not [n for n in names if n.endswith(".tmp") or (n.startswith(".") and n != ".avel.lock")], names
    assert {"config.json", "model.safetensors", "metrics.jsonl", "run.yaml", "last"} <= set(names)
    # A write that fails half way leaves the old file intact and no temporary file behind.
    target = tmp_path / "run" / "config.json"
    before = target.read_text()
    with pytest.raises((TypeError, AttributeError)):
        atomic_write(target, None)
    assert target.read_text() == before
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoint.save_tensors(tmp_path / "run" / "model.safetensors", {"x": torch.zeros(2)})
    assert same_weights(weights(tmp_path / "run"), load_file(str(tmp_path / "run" / "model.safetensors")))
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]





# --- hostile or broken checkpoint folders: one CheckpointError naming the file ---------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("good") / "run"
    train(quick_config(data_root, epochs=1), run, progress=False)
    return run


def _copy(run: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, dst / name)
    return dst


def _rewrite(folder: Path, tensors=None, card=None, embed=True):
    """Rewrite the checkpoint with other tensors and/or another card (dict or raw text)."""
    state = load_file(str(folder / "model.safetensors")) if tensors is None else tensors
    text = card if isinstance(card, str) else json.dumps(card if card is not None else
                                                         json.loads((folder / "config.json").read_text()))
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"), metadata={"avel_card": text} if embed else None)
    (folder / "config.json").write_text(text)


def _card(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


BROKEN_FOLDERS = ["wrong_shape", "missing", "extra", "not_json", "list", "no_model", "unknown_model",
                  "unknown_kwarg", "wrong_type", "huge_hidden", "truncated", "lying_header", "old_layout_not_json"]


def break_checkpoint(folder: Path, case: str) -> Path:
    """Break the checkpoint folder ``folder`` in place the way ``case`` says (one of BROKEN_FOLDERS)."""
    state = load_file(str(folder / "model.safetensors"))
    card = _card(folder)
    key = sorted(state)[0]
    if case == "wrong_shape":
        _rewrite(folder, {**state, key: torch.zeros(3, 3)})
    elif case == "missing":
        _rewrite(folder, {k: v for k, v in state.items() if k != key})
    elif case == "extra":
        _rewrite(folder, {**state, "intruder.weight": torch.zeros(2)})
    elif case == "not_json":
        _rewrite(folder, card="{not json")
    elif case == "list":
        _rewrite(folder, card=[1, 2])
    elif case == "no_model":
        _rewrite(folder, card={k: v for k, v in card.items() if k != "model"})
    elif case == "unknown_model":
        _rewrite(folder, card={**card, "model": "no_such_model"})
    elif case == "unknown_kwarg":
        _rewrite(folder, card={**card, "model_kwargs": {**card["model_kwargs"], "bogus": 1}})
    elif case == "wrong_type":
        _rewrite(folder, card={**card, "model_kwargs": {**card["model_kwargs"], "hidden": "big"}})
    elif case == "huge_hidden":
        _rewrite(folder, card={**card, "model_kwargs": {**card["model_kwargs"], "hidden": 10**7}})
    elif case == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "lying_header":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[:8] = (10**12).to_bytes(8, "little")
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif case == "old_layout_not_json":
        _rewrite(folder, card="{not json", embed=False)
    return folder


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_checkpoint_folders_fail_with_one_clear_error(tmp_path, good_run, case):
    import resource
    import time

    folder = break_checkpoint(_copy(good_run, tmp_path / "ckpt"), case)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(checkpoint.CheckpointError) as err:
        avel.load(folder)
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000   # KiB: under 1 GB more
    message = str(err.value)
    assert str(folder) in message and "\n" not in message and len(message) < 600


def test_the_card_inside_the_weights_is_the_one_trusted(tmp_path, good_run):
    """A kill between the two files of a save can leave config.json behind; the weights file decides."""
    folder = _copy(good_run, tmp_path / "ckpt")
    (folder / "config.json").write_text("{half a file")
    model, card = avel.load(folder)
    assert card.model == "av_att" and card.training["epoch"] == 1
