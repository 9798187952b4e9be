"""Localization of real encoded clips: variable length, spans, bad inputs in a batch, visualize."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import avel
from avel import ModelCard, build_model
from avel.cli import main
from avel.engine import checkpoint
from avel.features.backbones.logmel import LOGMEL_SPEC
from avel.features.media import write_clip
from avel.inference import Localization, LocalizeError, Localizer, Span, merge_spans
from avel.models.registry import complete_arguments, model_class
from avel.spec import AVE_OFFICIAL, FeatureSpec, StreamSpec
from avel.viz.attention import colormap, grid_image, overlay, upsample

from _support.media import tone
from _support.png import read_png

CLASSES = ["Bell", "Bird", "Alarm", "background"]
GRID = (2, 2)          # efficientnet-lite0 at 64x64 input: ceil(64 / 32) = 2
FPS = 4                # frames averaged per second in the feature spec: keeps the tests cheap

REAL_SPEC = FeatureSpec(
    dataclasses.replace(LOGMEL_SPEC, fps=1.0),
    StreamSpec("efficientnet-lite0", 1280, GRID, 1.0, FPS, 0, "imagenet-lite0-wheel", "lite-mean127-std128"),
)
SYNTH_SPEC = FeatureSpec(
    StreamSpec("synthetic", 128, (), 1.0, 1, 0, "none", "synthetic"),
    StreamSpec("synthetic", 1280, GRID, 1.0, 1, 0, "none", "synthetic"),
)


def save_model(folder: Path, name: str, *, task: str = "supervised", spec: FeatureSpec | None = None,
               classes=CLASSES, **kwargs) -> Path:
    """A checkpoint folder of a fresh ``name`` model with its card, as training would write it."""
    model = build_model(name, **kwargs)
    card = ModelCard(model=name, model_kwargs=complete_arguments(name, kwargs), task=task, class_names=tuple(classes),
                     feature_spec=spec, outputs=model_class(name).outputs, training={"segments": 10})
    return checkpoint.save(folder, model, card)


def _save(folder: Path, name: str = "av_att", spec: FeatureSpec | None = REAL_SPEC, **kw) -> Path:
    torch.manual_seed(1)
    kwargs = dict(audio_dim=128, visual_dim=1280, grid=GRID, num_classes=len(CLASSES), hidden=16)
    if name in ("av_att", "visual_att", "dmrn"):
        kwargs["att_hidden"] = 32
    kwargs.update(kw)
    return save_model(folder, name, spec=spec, **kwargs)     # as if trained on 10 s clips


def _clip(path: Path, seconds: int, *, audio: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (seconds * 8, 64, 64, 3), dtype=np.uint8)
    return write_clip(path, frames, 8, tone(seconds, 440 + 100 * seed) if audio else None)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("localize")
    ckpt = _save(root / "ckpt")
    clips = {"3s": _clip(root / "three.mp4", 3, seed=1), "14s": _clip(root / "fourteen.mp4", 14, seed=2),
             "silent": _clip(root / "noaudio.mp4", 2, audio=False)}
    garbage = root / "garbage.mp4"
    garbage.write_bytes(b"this is not a video " * 64)
    clips["garbage"] = garbage
    return {"root": root, "ckpt": ckpt, "clips": clips, "loc": Localizer.from_checkpoint(ckpt)}


# ---------------------------------------------------------------------------------------------- spans

def test_merge_spans_hand_computed():
    bg = 3
    probs = np.array([
        [0.1, 0.1, 0.1, 0.7],   # background
        [0.6, 0.2, 0.1, 0.1],   # Bell
        [0.8, 0.1, 0.0, 0.1],   # Bell
        [0.1, 0.5, 0.2, 0.2],   # Bird
        [0.1, 0.1, 0.1, 0.7],   # background
        [0.2, 0.1, 0.6, 0.1],   # Alarm (last second)
    ])
    spans = merge_spans(probs, CLASSES, bg)
    assert [(s.start, s.end, s.label, s.index) for s in spans] == [(1, 3, "Bell", 0), (3, 4, "Bird", 1),
                                                                     (5, 6, "Alarm", 2)]
    assert spans[0].score == pytest.approx(0.7)
    assert spans[1].score == pytest.approx(0.5)
    assert spans[2].score == pytest.approx(0.6)
    assert spans[0].duration == 2
    assert merge_spans(np.tile([0.1, 0.1, 0.1, 0.7], (5, 1)), CLASSES) == []
    assert merge_spans(np.tile([0.9, 0.0, 0.0, 0.1], (4, 1)), CLASSES)[0] == Span(0, 4, "Bell", pytest.approx(0.9), 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(0, 2**32 - 1))
def test_spans_are_the_runs_of_the_labels(labels, seed):
    """Any label sequence: the spans tile exactly its non-background runs, each scored by its mean."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 0.2, (len(labels), len(CLASSES)))
    probs[np.arange(len(labels)), labels] = 1.0
    spans = merge_spans(probs, CLASSES)
    covered = [3] * len(labels)
    for s in spans:
        assert s.start < s.end and s.label == CLASSES[s.index] and s.index != 3
        assert s.score == pytest.approx(probs[s.start:s.end, s.index].mean())
        covered[s.start:s.end] = [s.index] * s.duration
    assert covered == labels
    for a, b in zip(spans, spans[1:]):
        assert a.end <= b.start and (a.end < b.start or a.index != b.index)     # maximal runs


# ---------------------------------------------------------------------------------------------- variable length

@pytest.mark.parametrize("key,seconds", [("3s", 3), ("14s", 14)])
def test_localize_any_length(work, key, seconds):
    """A checkpoint 'trained on 10 s' localizes 3 s and 14 s videos: T = the video's whole seconds,
    and the whole sequence goes through the model at once (no windowing)."""
    loc: Localizer = work["loc"]
    r = loc.localize(work["clips"][key])
    assert isinstance(r, Localization)
    assert r.seconds == seconds and r.probs.shape == (seconds, len(CLASSES))
    assert np.allclose(r.probs.sum(1), 1, atol=1e-5)
    assert len(r.labels) == seconds and set(r.labels) <= set(CLASSES)
    assert r.attention.shape == (seconds, *GRID)
    assert np.allclose(r.attention.sum((1, 2)), 1, atol=1e-5)
    assert r.duration == pytest.approx(seconds, abs=0.1)
    # Spans are exactly the non-background runs of the labels.
    covered = ["background"] * seconds
    for s in r.spans:
        covered[s.start:s.end] = [s.label] * s.duration
        assert s.score == pytest.approx(r.probs[s.start:s.end, s.index].mean(), abs=1e-6)
    assert covered == r.labels
    # Same as running the model once over the whole extracted sequence.
    feats = loc.features(work["clips"][key])
    assert feats.audio.shape == (seconds, 128) and feats.visual.shape == (seconds, *GRID, 1280)
    with torch.inference_mode():
        out = loc.model(torch.from_numpy(feats.audio)[None], torch.from_numpy(feats.visual)[None])
    assert np.allclose(out["logits"][0].softmax(-1).numpy(), r.probs, atol=1e-5)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["seconds"] == seconds and len(d["probs"]) == seconds and d["class_names"] == CLASSES


def test_long_clip_streams_through_in_chunks(work, monkeypatch):
    """A clip streams through the backbones a chunk of seconds and a block of sound at a time (as `avel
    extract` does), holding neither its frames nor its waveform whole, and localizes exactly as in one pass."""
    import avel.features.extract.video as video

    loc: Localizer = work["loc"]
    one = Localizer(loc.model, loc.card, chunk_seconds=None).localize(work["clips"]["14s"])
    monkeypatch.setattr(video, "AUDIO_BLOCK_SECONDS", 4)
    audio_bb, visual_bb = loc.backbones()
    seen = {"frames": 0, "samples": 0}

    class Watch:
        """The backbone, recording the longest input (samples or frames) it is handed."""

        def __init__(self, backbone, key):
            self.backbone, self.key = backbone, key

        def __getattr__(self, name):                  # spec, input_size...
            return getattr(self.backbone, name)

        def __call__(self, x, *args):
            seen[self.key] = max(seen[self.key], len(x))
            return self.backbone(x, *args)

    small = Localizer(loc.model, loc.card, chunk_seconds=3)
    small._backbones = (Watch(audio_bb, "samples"), Watch(visual_bb, "frames"))
    r = small.localize(work["clips"]["14s"])
    assert r.seconds == 14
    np.testing.assert_array_equal(r.probs, one.probs)
    np.testing.assert_array_equal(r.attention, one.attention)
    assert seen["samples"] <= 4 * 16000 and 0 < seen["frames"] <= 64
    with pytest.raises(ValueError, match="chunk_seconds"):
        Localizer(loc.model, loc.card, chunk_seconds=0)


def test_precomputed_features(work):
    loc: Localizer = work["loc"]
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(5, 128)).astype(np.float32)
    visual = np.abs(rng.normal(size=(5, *GRID, 1280))).astype(np.float32)
    a = loc.localize((audio, visual))
    b = loc.localize({"audio": audio, "visual": visual}, name="mine")
    assert a.seconds == 5 and b.video == "mine"
    assert np.allclose(a.probs, b.probs)
    feats = loc.features(work["clips"]["3s"])
    c = loc.localize(feats)
    assert c.seconds == 3
    with pytest.raises(LocalizeError, match=r"visual grid is \[1, 2\], the model's attention takes \[2, 2\]"):
        loc.localize((audio, visual[:, :1]))
    with pytest.raises(LocalizeError, match="visual features are 64-d, the model takes 1280-d"):
        loc.localize((audio, visual[..., :64]))
    with pytest.raises(LocalizeError, match="same T"):
        loc.localize((audio[:4], visual))
    with pytest.raises(TypeError):
        loc.localize(42)


def test_public_api_lazy():
    assert avel.Localizer is Localizer


# ---------------------------------------------------------------------------------------------- batches and errors

def test_batch_with_bad_inputs(work, tmp_path, capsys):
    c = work["clips"]
    missing = work["root"] / "missing.mp4"
    videos = [c["3s"], missing, c["garbage"], c["silent"], c["14s"]]
    rc = main(["localize", *map(str, videos), "--checkpoint", str(work["ckpt"]), "--out", str(tmp_path / "out"),
               "--report"])
    assert rc == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["videos"]
    status = {Path(s["video"]).name: s for s in summary}
    assert status["three.mp4"]["status"] == "ok" and status["fourteen.mp4"]["status"] == "ok"
    assert "file not found" in status["missing.mp4"]["error"]
    assert "not a readable video" in status["garbage.mp4"]["error"]
    assert "no audio stream" in status["noaudio.mp4"]["error"]
    r14 = json.loads((tmp_path / "out" / "fourteen.json").read_text())
    assert r14["seconds"] == 14 and len(r14["labels"]) == 14
    err = capsys.readouterr().err
    assert "missing.mp4: file not found" in err and "noaudio.mp4: no audio stream" in err
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count('class="timeline"') == 2 and report.count("data:image/png;base64,") == 3 + 14
    assert "could not be localized" in report and "no audio stream" in report


def test_csv_output_and_cli(work, tmp_path):
    rc = main(["localize", str(work["clips"]["3s"]), "--checkpoint", str(work["ckpt"]), "--out",
               str(tmp_path / "o"), "--format", "csv"])
    assert rc == 0
    rows = (tmp_path / "o" / "three.csv").read_text().splitlines()
    assert rows[0].startswith("second,start,end,label,score,p:Bell") and len(rows) == 4
    assert (tmp_path / "o" / "three_spans.csv").read_text().startswith("start,end,label,score")
    assert "three.mp4,ok,3" in (tmp_path / "o" / "summary.csv").read_text()


def test_synthetic_spec_cannot_localize_video(work, tmp_path):
    loc = Localizer.from_checkpoint(_save(tmp_path / "synth", spec=SYNTH_SPEC))
    with pytest.raises(LocalizeError, match="synthetic features"):
        loc.localize(work["clips"]["3s"])
    # ...but precomputed features are fine.
    r = loc.localize((np.zeros((2, 128), np.float32), np.zeros((2, *GRID, 1280), np.float32)))
    assert r.seconds == 2
    assert main(["localize", str(work["clips"]["3s"]), "--checkpoint", str(tmp_path / "synth"),
                 "--out", str(tmp_path / "o")]) == 2


def test_missing_weights_clear_message(work, tmp_path, monkeypatch, capsys):
    for var in ("AVEL_VGG19_WEIGHTS", "AVEL_VGGISH_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    ckpt = save_model(tmp_path / "official", "av_att", spec=AVE_OFFICIAL, num_classes=4)
    rc = main(["localize", str(work["clips"]["3s"]), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "weights" in err and ("vggish-10086976.pth" in err or "vgg19" in err)
    assert "--audio-weights FILE" in err and "Traceback" not in err


def test_non_segment_model_refused(tmp_path):
    """The cml model returns distances, not segment_scores: refused by its card, nothing is probed."""
    ckpt = save_model(tmp_path / "cml", "cml", task="cml")
    with pytest.raises(LocalizeError, match="segment_scores"):
        Localizer.from_checkpoint(ckpt)


def test_scores_are_the_models_segment_scores(work):
    """What the localizer reports per second is the model's own segment_scores, whatever its head."""
    loc: Localizer = work["loc"]
    rng = np.random.default_rng(3)
    audio, visual = rng.normal(size=(4, 128)).astype(np.float32), rng.normal(size=(4, *GRID, 1280)).astype(np.float32)
    with torch.inference_mode():
        out = loc.model(torch.from_numpy(audio)[None], torch.from_numpy(visual)[None])
    r = loc.localize((audio, visual))
    np.testing.assert_allclose(r.probs, out["segment_scores"][0].numpy(), atol=1e-6)
    assert loc.facts()["model"] == "av_att" and loc.facts()["classes"] == CLASSES


def test_checkpoint_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Localizer.from_checkpoint(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- visualize

def test_visualize_writes_overlays(work, tmp_path):
    out = tmp_path / "att"
    rc = main(["visualize", str(work["clips"]["3s"]), "--checkpoint", str(work["ckpt"]), "--out", str(out), "--mp4"])
    assert rc == 0
    pngs = sorted(out.glob("second_*.png"))
    assert len(pngs) == 3
    img = read_png(pngs[0])
    assert img.shape == (64, 64, 3) and img.std() > 1
    grid = read_png(out / "grid.png")
    assert grid.shape[1] > 3 * 64 and grid.shape[0] > 64


    with av.open(str(out / "overlay.mp4")) as c:
        assert c.streams.video and c.streams.audio
        n = sum(1 for _ in c.decode(video=0))
    assert n == 3 * 16


def test_visualize_refuses_model_without_attention(work, tmp_path, capsys):
    ckpt = _save(tmp_path / "av", name="av")
    rc = main(["visualize", str(work["clips"]["3s"]), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "no audio-guided attention" in capsys.readouterr().err


def test_overlay_and_colormap():
    cm = colormap(np.array([0.0, 0.5, 1.0]))
    assert cm.shape == (3, 3) and cm.dtype == np.uint8 and not np.array_equal(cm[0], cm[2])
    up = upsample(np.array([[0.0, 1.0], [0.0, 1.0]]), (8, 8))
    assert up.shape == (8, 8) and up[:, 0].max() < up[:, -1].min()
    frame = np.full((16, 16, 3), 128, np.uint8)
    o = overlay(frame, np.array([[0.1, 0.9], [0.0, 0.0]]))
    assert o.shape == frame.shape and not np.array_equal(o[2, 12], o[12, 2])   # hot cell differs from cold
    g = grid_image(np.zeros((7, 10, 12, 3), np.uint8), classes=[0, 1, 3, 3, 2, 0, 1], background=3, cols=5)
    assert g.shape == (2 * (10 + 6) + 3 * 4, 5 * 12 + 6 * 4, 3)


# ---------------------------------------------------------------------------------------------- every model

SMALL = {"hidden": 16, "att_hidden": 32, "head_hidden": 16, "d_model": 32, "ff_dim": 64, "channel_hidden": 32,
         "spatial_hidden": 16, "bottleneck": 16}
SEGMENT_MODELS = [m for m in avel.available_models() if "segment_scores" in model_class(m).outputs]


@pytest.mark.parametrize("name", SEGMENT_MODELS)
def test_every_segment_model_localizes_a_video_and_reports_it(work, tmp_path, name):
    """A checkpoint of any registered segment model: `avel localize --report` on a real clip, attention
    maps drawn exactly when the model returns audio-guided attention."""
    torch.manual_seed(0)
    cls = model_class(name)
    task = getattr(cls, "tasks", ("supervised",))[0]
    allowed = complete_arguments(name, {})
    kwargs = {k: v for k, v in SMALL.items() if k in allowed}
    ckpt = save_model(tmp_path / "ckpt", name, task=task, spec=REAL_SPEC, audio_dim=128, visual_dim=1280,
                      grid=GRID, num_classes=len(CLASSES), **kwargs)
    out = tmp_path / "out"
    assert main(["localize", str(work["clips"]["3s"]), "--checkpoint", str(ckpt), "--out", str(out),
                 "--report"]) == 0
    result = json.loads((out / "three.json").read_text())
    assert result["seconds"] == 3 and len(result["labels"]) == 3
    assert all(label in CLASSES for label in result["labels"])
    report = (out / "report.html").read_text()
    assert report.count('class="timeline"') == 1
    images = report.count("data:image/png;base64,")
    assert (images == 3) == ("attention" in cls.outputs), (name, images)
