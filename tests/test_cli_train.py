"""train -> evaluate through the command line, and the refusals where features meet a checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from avel import metrics
from avel.cli import build_parser, main
from avel.data.datasets import AVEData
from avel.engine.train import train

from _coredata import TINY_MODEL, quick_config, small_folder, synth

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return small_folder(tmp_path_factory)


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
    assert "do not fit checkpoint" in err and "visual" in err and "24" in err and "16" in err
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
    from avel.compat import ave_class_names
    from avel.data.annotations import parse_annotations

    assert list(ave_class_names()) == parse_annotations(ave_dir / "Annotations.txt").class_names
    # The matching folder is accepted.
    assert main(["evaluate", "--data-root", str(data_root), "--checkpoint", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["videos"] > 0


def test_parser_shared_options():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--data-root", "x", "--checkpoint", "y", "--json", "--device", "cpu"])
    assert args.json and args.split == "test" and args.layout == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data-root", "x"])                 # --out is required

