"""CMBS (supervised `cmbs`, weakly supervised `cmbs_weak`) against the follow-up reference fixtures.

Weights are rebuilt from each weights_spec.json with the fixtures' regen_weights.py, converted with
convert_reference, and run on ../inputs.npz; every expected value is read from outputs.npz.
"""
from __future__ import annotations

import fnmatch
import inspect
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avel.models import cmbs

from _support.followups import forward_recording, strip_prefix

VARIANTS = {"cmbs": cmbs.CMBS, "cmbs_weak": cmbs.CMBSWeak}
ATOL32, ATOL64 = 1e-5, 1e-9


@pytest.fixture(scope="module")
def inputs(followups):
    z = np.load(followups / "inputs.npz")
    return torch.from_numpy(z["audio"]), torch.from_numpy(z["visual"])


@pytest.fixture(scope="module")
def reference_sd(regen, followups):
    """variant -> the reference state_dict with the DataParallel "module." prefix stripped."""
    return {name: strip_prefix(regen.state_dict_from_spec(followups / name / "weights_spec.json"))
            for name in VARIANTS}


@pytest.fixture(scope="module")
def expected(followups):
    return {name: dict(np.load(followups / name / "outputs.npz")) for name in VARIANTS}


# Modules whose output (or input) the fixtures store as intermediates.
HOOKS = {
    "cmbs": {"spatial_channel_att": "out", "audio_gate": "out", "video_gate": "out",
             "video_cas": "out", "audio_cas": "out", "localize": "in"},
    "cmbs_weak": {"spatial_channel_att": "out", "audio_gate": "out", "video_gate": "out",
                  "video_cas": "out", "audio_cas": "out", "cas_classifier": "both"},
}


def _run(model, audio, visual, hooks):
    seen = {}

    def record(name, args, output):
        if hooks[name] in ("in", "both"):
            seen[name + ".in"] = args[0]
        if hooks[name] in ("out", "both"):
            seen[name + ".out"] = output[0] if isinstance(output, tuple) else output

    return forward_recording(model, audio, visual, hooks, record), seen


@pytest.fixture(scope="module")
def runs(one_thread, reference_sd, inputs):
    """(variant, dtype) -> (model, outputs, intermediates) for the fixture weights, eval mode."""
    audio, visual = inputs
    res = {}
    for name, cls in VARIANTS.items():
        kwargs, sd = cls.convert_reference(reference_sd[name])
        for dtype in (torch.float32, torch.float64):
            model = cls(**kwargs).to(dtype)
            model.load_state_dict(sd)          # strict; float64 weights cast into the model's dtype
            model.eval()
            res[name, dtype] = (model, *_run(model, audio.to(dtype), visual.to(dtype), HOOKS[name]))
    return res


def _t(x):       # time first [T, B, ...] -> batch first
    return np.swapaxes(x, 0, 1)


def _pairs(name, out, mid, exp):
    """(label, avel value, fixture value), both batch first."""
    if name == "cmbs":
        return [
            ("event_logits", out["event_logits"], _t(exp["is_event_scores"])[..., 0]),
            ("class_logits", out["class_logits"], exp["event_scores"]),
            ("av_score", out["av_score"], exp["av_score"]),
            ("audio_visual_gate", out["audio_visual_gate"], _t(exp["audio_visual_gate"])[..., 0]),
            ("after_spatial_channel_att", mid["spatial_channel_att.out"],
             exp["intermediate_visual_after_spatial_channel_att"]),
            ("audio_gate", torch.sigmoid(mid["audio_gate.out"]), _t(exp["intermediate_audio_gate"])),
            ("video_gate", torch.sigmoid(mid["video_gate.out"]), _t(exp["intermediate_video_gate"])),
            ("video_cas", mid["video_cas.out"], _t(exp["intermediate_video_cas"])),
            ("audio_cas", mid["audio_cas.out"], _t(exp["intermediate_audio_cas"])),
            ("fused", mid["localize.in"], _t(exp["intermediate_fused_content"])),
        ]
    return [
        ("av_gate", out["av_gate"], exp["av_gate"]),
        ("sigmoid(event_logits)", torch.sigmoid(out["event_logits"]), exp["av_gate"]),
        ("raw_logits", out["raw_logits"], exp["raw_logits"]),
        ("softmax(video_logits)", out["video_logits"].softmax(-1), exp["event_scores"]),
        ("after_spatial_channel_att", mid["spatial_channel_att.out"],
         exp["intermediate_visual_after_spatial_channel_att"]),
        ("audio_gate", torch.sigmoid(mid["audio_gate.out"]), _t(exp["intermediate_audio_gate"])),
        ("video_gate", torch.sigmoid(mid["video_gate.out"]), _t(exp["intermediate_video_gate"])),
        ("video_cas", mid["video_cas.out"], _t(exp["intermediate_video_cas"])),
        ("audio_cas", mid["audio_cas.out"], _t(exp["intermediate_audio_cas"])),
        ("fused", mid["cas_classifier.in"], exp["intermediate_fused_content"]),
        ("cas_model_out", mid["cas_classifier.out"], exp["intermediate_cas_model_out"]),
    ]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL32), (torch.float64, ATOL64)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_match_fixture(runs, expected, name, dtype, atol):
    _, out, mid = runs[name, dtype]
    # float32: atol 1e-5 plus a few ulps of relative slack for the visual features (|x| up to ~19,
    # where one float32 ulp is 2e-6); the returned outputs are all far inside atol alone.
    rtol = 1e-6 if dtype == torch.float32 else 0
    for label, got, ref in _pairs(name, out, mid, expected[name]):
        assert got.dtype == dtype, label
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=rtol, atol=atol, err_msg=label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cmbs_predictions_and_accuracy(runs, expected, dtype):
    _, out, _ = runs["cmbs", dtype]
    exp = expected["cmbs"]
    pred = out["segment_scores"].argmax(-1).numpy()
    np.testing.assert_array_equal(pred, exp["pred_segments"])
    accuracy = 100 * np.mean(pred == exp["labels"].argmax(-1))
    assert accuracy == pytest.approx(float(exp["eval_accuracy"]), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cmbs_weak_decisions(runs, expected, dtype):
    _, out, _ = runs["cmbs_weak", dtype]
    exp = expected["cmbs_weak"]
    labels = exp["labels_segments"].argmax(-1)
    # The model's own decision is the corrected rule (gate thresholded directly).
    pred = out["segment_scores"].argmax(-1).numpy()
    np.testing.assert_array_equal(pred, exp["ALT_pred_segments_gate_gt_0p5"])
    np.testing.assert_array_equal(cmbs.corrected_weak_decision(out).numpy(), exp["ALT_pred_segments_gate_gt_0p5"])
    assert 100 * np.mean(pred == labels) == pytest.approx(float(exp["ALT_eval_accuracy_gate_gt_0p5"]), abs=1e-12)
    # The repository's rule: degenerate, one class per video on every segment.
    repo = cmbs.repository_weak_decision(out)
    assert repo.dtype == torch.long and repo.shape == out["av_gate"].shape
    np.testing.assert_array_equal(repo.numpy(), exp["pred_segments"])
    assert (repo == repo[:, :1]).all(), "the repository rule is constant along time"
    assert 100 * np.mean(repo.numpy() == labels) == pytest.approx(float(exp["eval_accuracy"]), abs=1e-12)
    np.testing.assert_array_equal(repo[:, 0].numpy(), exp["pred_video"])
    np.testing.assert_array_equal(out["video_logits"].argmax(-1).numpy(), exp["pred_video_from_event_scores"])


def test_repository_weak_rule_is_degenerate_for_any_gate():
    """sigmoid(p) > 0.5 for every probability p > 0: even gates near 0 or 1 are 'foreground'."""
    gate = torch.tensor([[1e-6, 0.2, 0.5, 0.8, 1 - 1e-6]])
    raw = torch.tensor([[0.1, 2.0, 0.3]])
    assert cmbs.repository_weak_decision({"av_gate": gate, "raw_logits": raw}).tolist() == [[1] * 5]
    assert cmbs.corrected_weak_decision({"av_gate": gate, "raw_logits": raw}).tolist() == [[2, 2, 2, 1, 1]]


def _supervised_batch(labels: np.ndarray) -> dict:
    target = torch.from_numpy(labels).double()
    B, _, C = target.shape
    events = target[..., :-1].sum(1)                                       # [B, K] event segment counts
    cls = torch.where(events.sum(-1) > 0, events.argmax(-1), torch.full((B,), C - 1))
    return {"target": target, "video_label": F.one_hot(cls, C).double(), "index": torch.arange(B)}


def test_cmbs_targets(expected):
    exp = expected["cmbs"]
    is_event, video_class, has_event = cmbs.supervised_targets(torch.from_numpy(exp["labels"]).double())
    np.testing.assert_array_equal(is_event.numpy(), exp["labels_BCE"])
    np.testing.assert_array_equal(video_class.numpy(), exp["labels_event"])
    np.testing.assert_array_equal(has_event.numpy(), exp["labels_BCE"].max(1) > 0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL32), (torch.float64, ATOL64)])
def test_cmbs_reference_losses(runs, expected, dtype, atol):
    """The buggy reference terms (plain function) reproduce the fixture's loss values."""
    _, out, _ = runs["cmbs", dtype]
    exp = expected["cmbs"]
    out = {k: v.double() for k, v in out.items()}
    ref = cmbs.reference_supervised_losses(out, torch.from_numpy(exp["labels"]).double())
    for name, key in [("is_event", "loss_is_event"), ("gate", "label_is_gate"), ("cas", "loss_cas"),
                      ("event_class", "loss_event_class")]:
        assert float(ref[name]) == pytest.approx(float(exp[key]), abs=atol), name
    total = sum(cmbs.CMBS.loss_weights[k] * v for k, v in ref.items())
    assert float(total) == pytest.approx(float(exp["loss_total"]), abs=atol)
    validate = ref["is_event"] + ref["gate"] + ref["event_class"]
    assert float(validate) == pytest.approx(float(exp["loss_total_validate"]), abs=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cmbs_loss_terms_fixed(runs, expected, dtype):
    """The training hook: per-video terms with the two reference bugs fixed, checked from fixture arrays."""
    model, out, _ = runs["cmbs", dtype]
    exp = expected["cmbs"]
    batch = _supervised_batch(exp["labels"])
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    terms = model.loss_terms(out, batch, "supervised")
    assert set(terms) == set(cmbs.CMBS.loss_weights)
    B = exp["labels"].shape[0]
    for t in terms.values():
        assert t.shape == (B,)
    labels_bce = torch.from_numpy(exp["labels_BCE"])
    has_event = exp["labels_BCE"].max(1) > 0
    assert not has_event[2] and has_event[:2].all()        # the fixture's video 2 is background only
    # Unchanged term.
    assert float(terms["is_event"].mean()) == pytest.approx(float(exp["loss_is_event"]), abs=ATOL32)
    # Gate: plain BCE on the gate probability (not BCE-with-logits on it).
    gate = torch.from_numpy(_t(exp["audio_visual_gate"])[..., 0])
    fixed_gate = F.binary_cross_entropy(gate, labels_bce)
    assert float(terms["gate"].mean()) == pytest.approx(float(fixed_gate), abs=ATOL32)
    assert abs(float(fixed_gate) - float(exp["label_is_gate"])) > 1e-3      # really a different loss
    # Class terms: the background-only video is no longer trained towards class 0.
    for name, logits_key, loss_key in [("cas", "av_score", "loss_cas"), ("event_class", "event_scores", "loss_event_class")]:
        assert float(terms[name][2]) == 0.0
        logits = torch.from_numpy(exp[logits_key])
        bogus = F.cross_entropy(logits[2:3], torch.from_numpy(exp["labels_event"][2:3]))   # towards class 0
        assert int(exp["labels_event"][2]) == 0
        assert float(terms[name].sum()) == pytest.approx(float(exp[loss_key]) * B - float(bogus), abs=ATOL32 * B)
    with pytest.raises(ValueError):
        model.loss_terms(out, batch, "weak")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL32), (torch.float64, ATOL64)])
def test_cmbs_weak_losses(runs, expected, dtype, atol):
    model, out, _ = runs["cmbs_weak", dtype]
    exp = expected["cmbs_weak"]
    y = torch.from_numpy(exp["labels"]).to(dtype)
    # Reference (bug: soft-margin loss on softmax probabilities) reproduces the fixture.
    ref = cmbs.reference_weak_loss(out, y)
    assert float(ref) == pytest.approx(float(exp["loss_event_class"]), abs=atol)
    assert float(ref) == pytest.approx(float(exp["loss_total"]), abs=atol)
    # Fixed hook: the same loss on the pooled logits, rebuilt from the fixture's gate and raw logits.
    gate, raw = torch.from_numpy(exp["av_gate"]), torch.from_numpy(exp["raw_logits"])
    video_logits = (gate[:, :, None] * raw[:, None, :]).max(dim=1).values
    np.testing.assert_allclose(out["video_logits"].double().numpy(), video_logits.numpy(), rtol=0, atol=atol)
    yd = y.double()
    per_video = -(yd * F.logsigmoid(video_logits) + (1 - yd) * F.logsigmoid(-video_logits)).mean(-1)
    batch = {"video_label": y, "target": torch.from_numpy(exp["labels_segments"]).to(dtype),
             "index": torch.arange(3)}
    terms = model.loss_terms(out, batch, "weak")
    assert set(terms) == set(cmbs.CMBSWeak.loss_weights) and terms["event_class"].shape == (3,)
    np.testing.assert_allclose(terms["event_class"].double().numpy(), per_video.numpy(), rtol=0, atol=atol)
    with pytest.raises(ValueError):
        model.loss_terms(out, batch, "supervised")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_attribute_and_shapes(runs, name):
    _, out, _ = runs[name, torch.float32]
    cls = VARIANTS[name]
    assert set(out) == set(cls.outputs) and len(cls.outputs) == len(set(cls.outputs))
    B, T = 3, 10
    assert out["segment_scores"].shape == (B, T, 29)
    assert out["event_logits"].shape == (B, T)
    assert out["attention"].shape == (B, T, 7, 7)
    torch.testing.assert_close(out["attention"].sum((2, 3)), torch.ones(B, T))
    if name == "cmbs":
        assert out["class_logits"].shape == (B, 28)
    else:
        assert out["video_logits"].shape == (B, 29)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_convert_reference(reference_sd, name):
    cls = VARIANTS[name]
    sd = reference_sd[name]
    kwargs, converted = cls.convert_reference(sd)
    # The fixtures use the authors' sizes, which are the constructor defaults.
    params = inspect.signature(cls.__init__).parameters
    assert kwargs and all(params[k].default == v for k, v in kwargs.items())
    unused = cmbs.UNUSED_REFERENCE_KEYS if name == "cmbs" else cmbs.UNUSED_REFERENCE_KEYS_WEAK
    # Renames only: every avel tensor shares storage with a reference tensor.
    ptrs = {t.untyped_storage().data_ptr() for t in sd.values()}
    assert all(t.untyped_storage().data_ptr() in ptrs and t.dtype == torch.float64 for t in converted.values())
    assert sum(t.numel() for t in converted.values()) < sum(t.numel() for t in sd.values())
    kept = {t.untyped_storage().data_ptr() for t in converted.values()}
    dropped = [k for k, t in sd.items() if t.untyped_storage().data_ptr() not in kept]
    assert dropped and all(any(fnmatch.fnmatchcase(k, p) for p in unused) for k in dropped)

    some_key = "AVInter.video_multihead.out_proj.bias"
    missing = {k: v for k, v in sd.items() if k != some_key}
    with pytest.raises(ValueError, match="AVInter.video_multihead.out_proj.bias"):
        cls.convert_reference(missing)
    wrong = dict(sd, **{"video_cas.bias": torch.zeros(30, dtype=torch.float64)})
    with pytest.raises(ValueError, match="video_cas.bias"):
        cls.convert_reference(wrong)
    with pytest.raises(ValueError, match="bogus.weight"):
        cls.convert_reference(dict(sd, **{"bogus.weight": torch.zeros(1)}))
    with pytest.raises(ValueError):                      # the "module." prefix must be stripped first
        cls.convert_reference({"module." + k: v for k, v in sd.items()})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_checkpoint_file(regen, followups, tmp_path, name):
    """The file the repository writes (zip, float64 DataParallel state_dict) loads end to end."""
    sd = regen.state_dict_from_spec(followups / name / "weights_spec.json")
    path = tmp_path / "model_epoch_1_top1_0.000_best_model.pth.tar"
    torch.save(sd, path)
    assert zipfile.is_zipfile(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    path.unlink()
    stripped = {k.removeprefix("module."): v for k, v in loaded.items()}
    kwargs, converted = VARIANTS[name].convert_reference(stripped)
    model = VARIANTS[name](**kwargs).double()
    model.load_state_dict(converted)                     # strict


SMALL = dict(audio_dim=8, visual_dim=16, grid=(2, 3), num_classes=5, d_model=16, att_hidden=8,
             self_att_dim=8, encoder_ffn=32, decoder_ffn=24, heads=2, inter_heads=2)


def _random_batch(B, T, H, W, C, gen):
    audio = torch.rand(B, T, SMALL["audio_dim"], generator=gen)
    visual = torch.rand(B, T, H, W, SMALL["visual_dim"], generator=gen)
    cls = torch.randint(0, C - 1, (B,), generator=gen)
    fg = torch.rand(B, T, generator=gen) < 0.6
    fg[-1] = False                                       # one background-only video
    seg = torch.where(fg, cls[:, None], torch.full_like(fg, C - 1, dtype=torch.long))
    target = F.one_hot(seg, C).float()
    vid = torch.where(fg.any(1), cls, torch.full_like(cls, C - 1))
    return {"audio": audio, "visual": visual, "target": target, "video_label": F.one_hot(vid, C).float(),
            "index": torch.arange(B)}


@pytest.mark.parametrize("name,task,extra", [("cmbs", "supervised", dict(audio_rnn_hidden=4, visual_rnn_hidden=8)),
                                             ("cmbs_weak", "weak", {})])
def test_trains_a_few_steps(name, task, extra):
    torch.manual_seed(0)
    cls = VARIANTS[name]
    model = cls(**SMALL, **extra)
    gen = torch.Generator().manual_seed(1)
    batch = _random_batch(6, 6, 2, 3, SMALL["num_classes"], gen)     # T = 6: no fixed T

    def total():
        out = model(batch["audio"], batch["visual"])
        assert set(out) == set(cls.outputs) and out["segment_scores"].shape == (6, 6, 5)
        terms = model.loss_terms(out, batch, task)
        return sum(cls.loss_weights[k] * v.mean() for k, v in terms.items())

    model.eval()
    with torch.no_grad():
        before = float(total())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(15):
        opt.zero_grad()
        loss = total()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)     # the authors' clipping
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(total())
    assert np.isfinite(after) and after < before
