"""`avel demo` end to end at its small size: real clips -> features -> training -> localization -> report."""
from __future__ import annotations

import json
import re

import av
import h5py
import numpy as np
import pytest

from avel.cli import main
from avel.demo import CLASSES, SIZES, DemoResult, _shape_mask, plan_clip, run_demo


def test_clip_plan_has_event_and_fooling_seconds():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sound, obj, start, end = plan_clip(rng, 10)
        assert 0 <= start < end <= 10 and end - start >= 2
        assert sound[start:end].all() and obj[start:end].all()
        outside = np.r_[0:start, end:10]
        assert not (sound[outside] & obj[outside]).any()      # background: never both


def test_shapes_differ():
    masks = {s: _shape_mask(s, 40) for s in ("circle", "square", "diamond", "triangle")}
    for a in masks:
        for b in masks:
            if a != b:
                assert (masks[a] != masks[b]).sum() > 40


@pytest.mark.slow
def test_demo_small_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "small", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[5/5] writing the report" in printed
    m = re.search(r"test segment accuracy: ([0-9.]+)", printed)
    assert m, printed
    info = json.loads((out / "demo.json").read_text())
    assert info["status"] == "done"
    assert isinstance(info["accuracy"], float) and 0.0 <= info["accuracy"] <= 1.0
    assert 0.0 < info["majority_rate"] < 1.0
    # The clips are learnable only by combining sight and sound; even the small run must beat
    # "background everywhere" clearly (0.917 vs 0.417 when written).
    assert info["accuracy"] >= info["majority_rate"] + 0.2
    assert float(m.group(1)) == pytest.approx(info["accuracy"], abs=1e-3)

    # Real media: H.264 video and AAC audio.
    cfg = SIZES["small"]
    clips = sorted((out / "clips").glob("*.mp4"))
    assert len(clips) == cfg.train + cfg.val + cfg.test
    with av.open(str(clips[0])) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"

    # An AVE-layout folder `avel train` can use.
    data = out / "data"
    lines = (data / "Annotations.txt").read_text().splitlines()
    assert len(lines) == len(clips) and lines[0].startswith(f"{CLASSES[0]}&demo0000&good&")
    for split in ("train", "val", "test"):
        with h5py.File(data / f"{split}_order.h5") as f:
            assert len(f["order"]) == getattr(cfg, split)
    spec = json.loads((data / "features.json").read_text())["spec"]
    assert spec["visual"]["backbone"] == "efficientnet-lite0" and spec["audio"]["backbone"] == "logmel"

    # A checkpoint and the report with its timeline.
    assert (out / "run" / "model.safetensors").is_file()
    report = (out / "report.html").read_text()
    assert 'class="timeline"' in report and "ground truth" in report and "data:image/png;base64," in report
    assert report.count('<section class="video"') == cfg.test
    assert str(out / "report.html") in printed


def test_demo_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--size", "small", "--no-progress"]) == 2
    assert "avel demo: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not an avel demo folder"):
        run_demo(tmp_path, size="small", progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_demo_returns_its_result_and_prints_nothing(tmp_path, capsys):
    """The library run is silent (stages go to ``notify``) and returns the numbers the command prints."""
    said = []
    r = run_demo(tmp_path / "d", size="small", progress=False, notify=said.append)
    assert capsys.readouterr().out == ""
    assert isinstance(r, DemoResult) and r.size == "small" and len(said) == 10 and said[0].startswith("[1/5]")
    assert len(r.clips) == SIZES["small"].test and r.report.is_file() and r.segments == 4 * 6
    assert json.loads((tmp_path / "d" / "demo.json").read_text())["accuracy"] == pytest.approx(r.accuracy)
