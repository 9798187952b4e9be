"""The command line as a user meets it: one parser, shared options, and library errors as one line + exit code."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import avel
from avel.cli import app as cli_app
from avel.cli import build_parser, main
from avel.config import recipe
from avel.features.weights import WeightsNotFoundError


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "avel", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "synth"
    assert main(["data", "synth", str(root), "--videos", "24", "--classes", "3", "--visual-dim", "8",
                 "--audio-dim", "8", "--background-videos", "4"]) == 0
    return root


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"avel {avel.__version__}"
    for command in ("demo", "train", "evaluate", "models", "convert-original", "extract", "localize", "visualize"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--device" in text and "--verbose" in text          # the shared group is on every command


def test_shared_groups_parse_the_same_everywhere():
    parser = build_parser()
    for argv in (["localize", "v.mp4", "--checkpoint", "c"], ["visualize", "v.mp4", "--checkpoint", "c"],
                 ["extract", "videos", "--out", "o"]):
        args = parser.parse_args(argv + ["--audio-weights", "a.pth", "--device", "cpu", "-vv"])
        assert args.audio_weights == "a.pth" and args.visual_weights is None and args.verbose == 2
    args = parser.parse_args(["evaluate", "--data-root", "x", "--checkpoint", "y", "--json"])
    assert args.json and args.split == "test" and args.layout == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data-root", "x"])                 # --out is required


def test_data_tools(synth_root, tmp_path, capsys):
    capsys.readouterr()
    assert main(["data", "check", str(synth_root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == []
    assert main(["data", "pack", str(synth_root), "--dtype", "float32"]) == 0
    assert "packed layout at" in capsys.readouterr().out
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("av_att: ") for line in listed)


def test_library_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    rc = main(["evaluate", "--data-root", str(tmp_path), "--checkpoint", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("avel evaluate: error: ") and "nope" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # the sub-command is named too
    assert main(["data", "pack", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("avel data pack: error: ")


def test_traceback_only_with_vv(tmp_path, capsys):
    assert main(["data", "pack", str(tmp_path / "missing"), "-vv"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "avel data pack: error: " in err


def test_python_dash_m_exit_code(tmp_path):
    proc = _run("data", "pack", tmp_path / "missing")
    assert proc.returncode == 2 and proc.stderr.startswith("avel data pack: error:") and "Traceback" not in proc.stderr


def test_error_messages():
    assert cli_app.error_message(KeyError("unknown model 'x'")) == "unknown model 'x'"    # no extra quotes
    msg = cli_app.error_message(WeightsNotFoundError("vgg19 weights not found"))
    assert msg.startswith("vgg19 weights not found") and "--visual-weights FILE" in msg


def test_interrupt_is_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("avel.cli.models.run", interrupted)
    assert main(["models"]) == 130 and "interrupted" in capsys.readouterr().err


def test_extract_usage_errors(tmp_path, capsys):
    assert main(["extract", str(tmp_path)]) == 2
    assert "avel extract: error: --out is required" in capsys.readouterr().err
    assert main(["extract", "merge"]) == 2
    assert "usage: avel extract merge OUT" in capsys.readouterr().err
    assert main(["extract", "merge", str(tmp_path)]) == 2                # nothing to merge: a library error
    assert "no shard" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_conflicting_train_flags_are_refused(synth_root, tmp_path, capsys):
    """A --config file with --task/--recipe that contradict it was silently dropped before; now refused."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(recipe("original", "supervised").to_dict()))
    rc = main(["train", "--data-root", str(synth_root), "--out", str(tmp_path / "run"), "--config", str(config),
               "--task", "weak"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("avel train: error: ") and "--task" in err
    rc = main(["train", "--data-root", str(synth_root), "--out", str(tmp_path / "run"), "--epochs", "2",
               "--set", "epochs=3"])
    assert rc == 2 and "epochs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_convert_original_missing_file(tmp_path, capsys):
    rc = main(["convert-original", str(tmp_path / "AV_att.pt"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("avel convert-original: error: ") and "AV_att.pt" in err
    assert not (tmp_path / "out").exists()


def test_convert_original_of_a_follow_up_file_then_evaluate_its_card(tmp_path, fixtures_dir, capsys):
    """The PSP release format through the CLI: kind from the pickled class, card with the AVE facts."""
    src = fixtures_dir / "followups" / "psp" / "PSP_fully_whole_legacy_cuda.pt"
    assert main(["convert-original", str(src), str(tmp_path / "psp")]) == 0
    assert "psp, supervised task" in capsys.readouterr().out
    model, card = avel.load(tmp_path / "psp")
    assert card.model == "psp" and card.source["kind"] == "psp" and len(card.class_names) == 29
    assert card.feature_spec.visual.backbone == "vgg19-pool5"
    (tmp_path / "file").write_text("x")
    assert main(["convert-original", str(src), str(tmp_path / "file")]) == 2
    assert "destination is a file" in capsys.readouterr().err
    assert main(["convert-original", str(src), str(tmp_path / "x"), "--kind", "cmbs"]) == 2
    assert "error:" in capsys.readouterr().err
