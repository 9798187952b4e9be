"""Config presets and overrides, the training loop (determinism, resume, selection), checkpoints,
the original loss, and the train -> evaluate command line."""
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
from avel.cli import build_parser, main
from avel.config import RunConfig, apply_overrides, recipe
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


# --- config -------------------------------------------------------------------------------------

def test_original_presets():
    sup = recipe("original", "supervised")
    assert (sup.optim.name, sup.optim.lr, sup.batch_size, sup.epochs) == ("adam", 1e-3, 64, 300)
    assert (sup.optim.schedule, sup.optim.step_every, sup.optim.gamma) == ("step", 15000, 0.1)
    assert sup.eval_every == 5 and sup.loss == "softmax_mlsm" and sup.shuffle is False
    weak = recipe("original", "weak")
    assert weak.epochs == 250 and weak.task == "weak" and weak.batch_size == 64 and weak.optim.lr == 1e-3
    cml = recipe("original", "cml")
    assert (cml.model, cml.batch_size, cml.epochs, cml.margin) == ("cml", 8, 20, 2.0)
    modern = recipe("modern", "supervised")
    assert modern.loss == "ce" and modern.shuffle and modern.optim.name == "adamw" and modern.optim.schedule == "cosine"
    # Presets are fresh objects: no shared mutable state between runs.
    assert recipe("original").model_kwargs is not recipe("original").model_kwargs
    with pytest.raises(ValueError):
        recipe("ancient")
    with pytest.raises(ValueError):
        recipe("original", "unsupervised")


def test_step_schedule_decays_every_15000_iterations():
    from avel.engine.train import make_optimizer, make_schedule

    cfg = recipe("original")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], cfg)
    sched = make_schedule(opt, cfg, 10**6)
    factor = sched.lr_lambdas[0]
    assert [factor(it) for it in (0, 14999, 15000, 29999, 30000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    # Applied to the optimizer as the iterations go (a short schedule with the same rule).
    cfg = apply_overrides(cfg, ["optim.step_every=3"])
    opt = make_optimizer([p], cfg)
    sched = make_schedule(opt, cfg, 100)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 3 + [1e-5])


@pytest.mark.parametrize("name", ["original", "modern"])
@pytest.mark.parametrize("task", ["supervised", "weak", "cml"])
def test_yaml_round_trip(tmp_path, name, task):
    cfg = apply_overrides(recipe(name, task), ["data.background=a,b", "seed=3"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides():
    cfg = apply_overrides(recipe("original"), ["optim.lr=3e-4", "epochs=7", "model=dmrn", "shuffle=true",
                                               "model_kwargs.hidden=32", "margin=1", "data.layout=h5"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 7 and cfg.model == "dmrn" and cfg.shuffle is True
    assert cfg.model_kwargs == {"hidden": 32}
    assert cfg.margin == 1.0 and isinstance(cfg.margin, float)
    assert cfg.data.layout == "h5"
    assert recipe("original").optim.lr == 1e-3                       # the preset itself is untouched
    for bad in (["optim.nope=1"], ["epochs=many"], ["optim.lr=fast"], ["lr"]):
        with pytest.raises(ValueError):
            apply_overrides(recipe("original"), bad)


def test_hand_written_yaml_reads_numbers_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: av\nepochs: 3\noptim:\n  lr: 3e-4\n  schedule: constant\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model == "av" and cfg.epochs == 3
    for text in ("optim:\n  lrr: 0.1\n", "data:\n  roots: x\n", "epoch: 3\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match="unknown config keys"):
            RunConfig.from_yaml(path)


def test_cli_config_file_and_set(tmp_path, data_root, cli_train_config):
    """`avel train --config X --set ...`: the config the trainer receives."""
    path = tmp_path / "run.yaml"
    path.write_text(recipe("modern").to_yaml())
    cfg = cli_train_config(["--data-root", str(data_root), "--out", str(tmp_path / "r"), "--config", str(path),
                            "--set", "optim.lr=3e-4", "--set", "model_kwargs.hidden=8", "--epochs", "2",
                            "--model", "av"])
    assert cfg.recipe == "modern" and cfg.loss == "ce"
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.epochs == 2 and cfg.model == "av"
    assert cfg.model_kwargs == {"hidden": 8} and cfg.data.root == str(data_root)


# --- the loss of the original recipe --------------------------------------------------------------

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


# --- training ---------------------------------------------------------------------------------------

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
    saved = checkpoint.read_config(tmp_path / "run")
    assert saved["epoch"] == result.best_epoch
    assert scores[saved["epoch"] - 1] == max(scores)           # the checkpoint has the best val score
    # Ties keep the later (longer-trained) weights: the last epoch with the max.
    assert saved["epoch"] == len(scores) - scores[::-1].index(max(scores))
    assert saved["selection"] == "accuracy"
    assert saved["selection_score"] == pytest.approx(max(scores)) == pytest.approx(result.best_score)
    assert [r["improved"] for r in records] == [s >= max(scores[:i], default=-1) for i, s in enumerate(scores)]
    assert max(i for i, r in enumerate(records, 1) if r["improved"]) == saved["epoch"]
    # The saved weights are those of that epoch: re-scoring val gives the recorded metrics.
    model = avel.load(tmp_path / "run")
    data = AVEData.open(root)
    task = build_task(cfg)
    val, _ = evaluate(model, task, task.eval_source(data, "val"), data.class_names)
    assert val["accuracy"] == pytest.approx(saved["val_metrics"]["accuracy"])
    with pytest.raises(Exception):
        real_split(data, "test")                                # it really is unreadable


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
    model = avel.load(ckpt)
    also = avel.load(ckpt / "config.json")
    assert not model.training
    assert same_weights(model.state_dict(), weights(ckpt)) and same_weights(also.state_dict(), weights(ckpt))
    data = AVEData.open(data_root)
    batch = data.store.read([0, 1])
    with torch.no_grad():
        out = model(torch.from_numpy(batch["audio"]), torch.from_numpy(batch["visual"]))
    assert out["logits"].shape == (2, 10, 4)
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
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    assert {"config.json", "model.safetensors", "metrics.jsonl", "run.yaml", "last"} <= set(names)
    # A write that fails half way leaves the old file intact and no temporary file behind.
    target = tmp_path / "run" / "config.json"
    before = target.read_text()
    with pytest.raises(TypeError):
        checkpoint.atomic_write_text(target, None)
    assert target.read_text() == before
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoint.atomic_save_tensors(tmp_path / "run" / "model.safetensors", {"x": torch.zeros(2)})
    assert same_weights(weights(tmp_path / "run"), load_file(str(tmp_path / "run" / "model.safetensors")))
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_models_not_built_by_avel(tmp_path):
    with pytest.raises(ValueError):
        checkpoint.save(tmp_path / "x", torch.nn.Linear(2, 2))


# --- command line -------------------------------------------------------------------------------------

def _run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "avel", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_train_then_evaluate_json(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data-root", str(data_root), "--out", str(out), "--model", "av_att", "--epochs", "3",
               "--batch-size", "16", "--no-progress", "--set", "eval_every=1", "--set", "optim.lr=3e-3",
               "--set", "threads=1"] + [f"--set=model_kwargs.{k}={v}" for k, v in TINY_MODEL.items()])
    assert rc == 0
    assert "best accuracy" in capsys.readouterr().out
    run_cfg = yaml.safe_load((out / "run.yaml").read_text())
    assert run_cfg["optim"]["lr"] == pytest.approx(3e-3) and run_cfg["epochs"] == 3
    preds = tmp_path / "pred.npz"
    proc = _run_cli("evaluate", "--data-root", data_root, "--checkpoint", out, "--split", "test", "--json",
                    "--predictions", preds)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["split"] == "test" and result["task"] == "supervised"
    p = np.load(preds)
    data = AVEData.open(data_root)
    test_rows = data.split("test")
    np.testing.assert_array_equal(p["index"], test_rows)
    np.testing.assert_array_equal(p["target"], data.targets[test_rows])
    assert p["scores"].shape == (len(test_rows), 10, 4)
    np.testing.assert_allclose(p["scores"].sum(-1), 1.0, rtol=1e-5)
    by_hand = float((p["scores"].argmax(-1) == data.targets[test_rows].argmax(-1)).mean())
    assert result["accuracy"] == pytest.approx(by_hand)
    assert result["segments"] == 10 * len(test_rows) and result["videos"] == len(test_rows)
    cm = np.array(result["confusion_matrix"])
    assert cm.sum() == result["segments"] and np.trace(cm) == round(by_hand * cm.sum())
    assert result["event_f1"] == pytest.approx(
        metrics.event_metrics(p["scores"], p["target"], 3)["event_f1"])


def test_checkpoint_refuses_features_of_another_spec(tmp_path, data_root, capsys, ave_dir):
    run = tmp_path / "run"
    train(quick_config(data_root, epochs=1), run, progress=False)
    other = synth(tmp_path / "other", videos=30, background_videos=0, visual_dim=24)
    rc = main(["evaluate", "--data-root", str(other), "--checkpoint", str(run), "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "do not match checkpoint" in err and "visual dim" in err and "24" in err and "16" in err
    # Same shapes, another backbone: refused for the spec, not for a shape error.
    relabeled = shutil.copytree(data_root, tmp_path / "relabeled")
    spec = json.loads((relabeled / "features.json").read_text())
    spec["spec"]["audio"]["backbone"] = "vggish"
    (relabeled / "features.json").write_text(json.dumps(spec))
    rc = main(["evaluate", "--data-root", str(relabeled), "--checkpoint", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "audio backbone" in err and "vggish" in err
    # Same features, another class list (4 event classes instead of 3): refused, not scored by index.
    more = synth(tmp_path / "more", videos=30, background_videos=0, classes=4)
    rc = main(["evaluate", "--data-root", str(more), "--checkpoint", str(run), "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and "classes" in err and "differ" in err
    # The official class list matches the real release's (what converted checkpoints record).
    from avel.cli import _ave_class_names
    from avel.data.annotations import parse_annotations

    assert _ave_class_names() == parse_annotations(ave_dir / "Annotations.txt").class_names
    # The matching folder is accepted.
    assert main(["evaluate", "--data-root", str(data_root), "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["videos"] > 0


def test_parser_shared_options():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--data-root", "x", "--checkpoint", "y", "--json", "--device", "cpu"])
    assert args.json and args.split == "test" and args.layout == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data-root", "x"])                 # --out is required


@pytest.mark.parametrize("name", ["original", "modern"])
@pytest.mark.parametrize("task", ["supervised", "weak", "cml"])
def test_shipped_config_files_equal_the_recipes(name, task):
    """configs/*.yaml are the recipes written out; they must not drift from the code."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}-{task}.yaml"
    assert RunConfig.from_yaml(path) == recipe(name, task)
