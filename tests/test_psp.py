"""PSP (fully and weakly supervised) against the reference fixtures of followups/psp and followups/psp_weak.

Weights are rebuilt with the fixtures' regen_weights.py and converted with convert_reference; every
expected value is read from the fixture files.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avel.models import build_model, psp

from _support.followups import assert_convert_refuses, eval_loss_before_and_after_training, forward_recording, load_npz

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5          # float32 reference values; float32 and float64 avel runs alike (README: <= 2.4e-6)


@pytest.fixture(scope="module")
def inputs(followups):
    return load_npz(followups / "inputs.npz")


def build(cls, followups, regen, variant, double=False):
    kwargs, sd = cls.convert_reference(regen.state_dict_from_spec(followups / variant / "weights_spec.json"))
    model = cls(**kwargs)
    if double:
        model.double()                   # before loading, so float64 weights are not rounded to float32
    model.load_state_dict(sd)            # strict
    return model.eval()


def run(model, inputs, double, capture=()):
    """Forward on the B = 3 inputs; ``capture`` names sub-modules whose outputs are recorded."""
    dtype = torch.float64 if double else torch.float32
    audio = torch.from_numpy(inputs["audio"]).to(dtype)
    visual = torch.from_numpy(inputs["visual"]).to(dtype)
    seen = {}
    out = forward_recording(model, audio, visual, capture, lambda name, args, output: seen.setdefault(name, (args, output)))
    return out, seen


def close(actual, expected, atol=ATOL):
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected.astype(np.float64), rtol=1e-5, atol=atol)


def attention_logits(att, audio_guide, visual):
    """z before the softmax, from the attention's own sub-modules (the per-position audio broadcast)."""
    B, T, H, W, Dv = visual.shape
    regions = visual.reshape(B * T, H * W, Dv)
    s = att.affine_v(torch.relu(att.affine_video(regions)))
    g = att.affine_g(torch.relu(att.affine_audio(audio_guide.reshape(B * T, -1))))
    return att.affine_h(torch.tanh(s + g[:, :, None])).view(B, T, H, W)


def segment_batch(labels):
    target = torch.from_numpy(labels).float()
    video = target.amax(1)
    return {"target": target, "video_label": video, "index": torch.arange(target.shape[0])}


# --- fully supervised PSP --------------------------------------------------------------------------

@pytest.mark.parametrize("double", [False, True])
def test_psp_outputs_and_intermediates(followups, regen, inputs, double):
    ref = load_npz(followups / "psp" / "outputs.npz")
    model = build(psp.PSP, followups, regen, "psp", double)
    assert model.psp.threshold == ref["thr_val"]
    out, seen = run(model, inputs, double, ("audio_proj", "attention", "visual_proj", "lstm_audio",
                                            "lstm_video", "psp"))
    assert set(out) == set(psp.PSP.outputs)
    close(out["logits"], ref["out"])
    close(out["avps"], ref["cross_att"])
    close(out["fusion"], ref["fusion"])
    close(out["attention"], ref["mid_attention_map"])
    np.testing.assert_array_equal(out["segment_scores"].argmax(-1).numpy(), ref["pred_segment"])
    fa = seen["audio_proj"][1]
    close(fa, ref["mid_fa_fea"])
    close(seen["attention"][1][0], ref["mid_video_t_attended"])
    dtype = torch.float64 if double else torch.float32
    with torch.no_grad():
        z = attention_logits(model.attention, fa, torch.from_numpy(inputs["visual"]).to(dtype))
    close(z, ref["mid_attention_logits"])
    close(seen["visual_proj"][1], ref["mid_video_t_fv"])
    close(seen["lstm_audio"][1][0], ref["mid_lstm_audio"])
    close(seen["lstm_video"][1][0], ref["mid_lstm_video"])
    close(seen["psp"][1][0], ref["mid_v_psp"])
    close(seen["psp"][1][1], ref["mid_a_psp"])
    # compute_acc: fraction of segments whose argmax equals the one-hot label.
    acc = (ref["pred_segment"] == ref["labels"].argmax(-1)).mean()
    assert acc == ref["accuracy"]


@pytest.mark.parametrize("double", [False, True])
def test_psp_loss_terms(followups, regen, inputs, double):
    ref = load_npz(followups / "psp" / "outputs.npz")
    model = build(psp.PSP, followups, regen, "psp", double)
    out, _ = run(model, inputs, double)
    batch = segment_batch(ref["labels"])
    np.testing.assert_array_equal(batch["target"].argmax(-1).numpy(), ref["segment_label_batch"])
    close(psp.avps_target(batch["target"]), ref["segment_avps_gt_batch"], atol=0)
    terms = model.loss_terms(out, batch, "supervised")
    assert set(terms) == set(psp.PSP.loss_weights)
    assert all(t.shape == (3,) for t in terms.values())
    close(terms["cls"].mean(), ref["loss_cls"])
    close(terms["avps"].mean(), ref["loss_avps"], atol=1e-7)
    assert psp.PSP.loss_weights["avps"] == ref["LAMBDA"]
    total = sum(psp.PSP.loss_weights[k] * t.mean() for k, t in terms.items())
    close(total, ref["loss"])
    with pytest.raises(ValueError):
        model.loss_terms(out, batch, "weak")


def test_avps_target_stale_buffer_vs_fresh(followups):
    ref = load_npz(followups / "psp" / "outputs.npz")
    first = torch.from_numpy(ref["labels"])
    second = torch.from_numpy(ref["labels_second_batch"])
    # The reference: one buffer for the whole dataset, never cleared.
    buffer = torch.zeros(first.shape[:2], dtype=torch.float32)
    close(psp.avps_target_reference(first, buffer), ref["segment_avps_gt_batch"], atol=0)
    stale = psp.avps_target_reference(second, buffer)
    close(stale, ref["segment_avps_gt_batch_second_stale"], atol=0)
    # The fix the training hook uses: a fresh target per batch.
    close(psp.avps_target(second), ref["segment_avps_gt_batch_second_fresh"], atol=0)
    assert not np.array_equal(ref["segment_avps_gt_batch_second_stale"], ref["segment_avps_gt_batch_second_fresh"])
    # A background-only video: column C-1 is the smallest non-empty one, 1/T on every segment.
    bg = torch.zeros(1, 4, 5)
    bg[..., -1] = 1
    torch.testing.assert_close(psp.avps_target(bg), torch.full((1, 4), 0.25))


# --- weakly supervised PSP -------------------------------------------------------------------------

@pytest.mark.parametrize("double", [False, True])
def test_psp_weak_outputs_and_intermediates(followups, regen, inputs, double):
    ref = load_npz(followups / "psp_weak" / "outputs.npz")
    model = build(psp.PSPWeak, followups, regen, "psp_weak", double)
    assert model.psp.threshold == ref["thr_val"]
    assert not model.psp.renormalise and not model.psp.refine
    out, seen = run(model, inputs, double, ("attention", "visual_proj", "lstm_audio", "lstm_video",
                                            "temporal_weight"))
    assert set(out) == set(psp.PSPWeak.outputs)
    close(out["logits"], ref["score"])
    close(out["video_prob"], ref["out_avg"])
    close(out["segment_scores"], ref["x_labels_softmax"])
    close(out["raw_logits"], ref["mid_score_unweighted"])
    close(out["temporal_weight"], ref["mid_temporal_wei"][..., 0])
    close(out["fusion"], ref["mid_fusion"])
    close(out["attention"], ref["mid_attention_map"])
    np.testing.assert_array_equal(out["segment_scores"].argmax(-1).numpy(), ref["pred_segment"])
    close(seen["temporal_weight"][1], ref["mid_W3_out"])
    close(seen["attention"][1][0], ref["mid_video_t_attended"])
    dtype = torch.float64 if double else torch.float32
    with torch.no_grad():
        z = attention_logits(model.attention, torch.from_numpy(inputs["audio"]).to(dtype),
                             torch.from_numpy(inputs["visual"]).to(dtype))
    close(z, ref["mid_attention_logits"])
    close(seen["visual_proj"][1], ref["mid_video_t_linear_v"])
    close(seen["lstm_audio"][1][0], ref["mid_lstm_audio"])
    close(seen["lstm_video"][1][0], ref["mid_lstm_video"])
    acc = (ref["pred_segment"] == ref["labels_segment"].argmax(-1)).mean()
    assert acc == ref["accuracy"]


@pytest.mark.parametrize("double", [False, True])
def test_psp_weak_loss(followups, regen, inputs, double):
    ref = load_npz(followups / "psp_weak" / "outputs.npz")
    model = build(psp.PSPWeak, followups, regen, "psp_weak", double)
    out, _ = run(model, inputs, double)
    batch = segment_batch(ref["labels_segment"])
    close(psp.event_proportions(batch["target"]), ref["prob_labels"], atol=1e-7)
    terms = model.loss_terms(out, batch, "weak")
    assert set(terms) == set(psp.PSPWeak.loss_weights) and terms["bce"].shape == (3,)
    close(terms["bce"].mean(), ref["loss"])
    with pytest.raises(ValueError):
        model.loss_terms(out, batch, "supervised")


# --- contract ------------------------------------------------------------------------------------

SMALL = dict(audio_dim=6, visual_dim=10, grid=(2, 3), num_classes=5, embed_dim=8, hidden=4, att_hidden=12,
             head_hidden=7)


def random_batch(B=6, T=4, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, C - 1, (B,), generator=g)
    on = torch.rand(B, T, generator=g) < 0.6
    on[:, 0] = True
    idx = torch.where(on, classes[:, None], torch.full((B, T), C - 1))
    target = torch.nn.functional.one_hot(idx, C).float()
    video = torch.nn.functional.one_hot(classes, C).float()
    return {"audio": torch.rand(B, T, 6, generator=g), "visual": torch.rand(B, T, 2, 3, 10, generator=g),
            "target": target, "video_label": video, "index": torch.arange(B)}


@pytest.mark.parametrize("name,task,extra", [("psp", "supervised", {"proj_hidden": 9}), ("psp_weak", "weak", {})])
def test_trains_and_contract(name, task, extra):
    torch.manual_seed(0)
    model = build_model(name, **SMALL, **extra)
    batch = random_batch()
    out = model(batch["audio"], batch["visual"])
    assert set(out) == set(type(model).outputs)
    assert out["segment_scores"].shape == (6, 4, 5) and out["attention"].shape == (6, 4, 2, 3)

    def total():
        terms = model.loss_terms(model(batch["audio"], batch["visual"]), batch, task)
        return sum(model.loss_weights[k] * t.mean() for k, t in terms.items())

    start, end = eval_loss_before_and_after_training(model, total)
    assert end < start


@pytest.mark.parametrize("cls,variant,unused", [(psp.PSP, "psp", psp.PSP_UNUSED_REFERENCE_KEYS),
                                                (psp.PSPWeak, "psp_weak", psp.PSP_WEAK_UNUSED_REFERENCE_KEYS)])
def test_convert_reference_checks(followups, regen, cls, variant, unused):
    sd = regen.state_dict_from_spec(followups / variant / "weights_spec.json")
    kwargs, converted = cls.convert_reference(dict(sd))
    assert kwargs["grid"] == (7, 7) and kwargs["num_classes"] == 29
    assert all(k in sd for k in unused)
    assert len(converted) == len(sd) - len(unused)
    assert all(converted[k].dtype == torch.float32 for k in converted)
    assert cls.reference_classes[0] == ("fully_model.psp_net" if variant == "psp" else "weakly_model.psp_net")
    assert_convert_refuses(cls, sd, missing="psp.v_L2.weight", wrong=("psp.layer_norm.bias", torch.zeros(255)),
                           extra=("spurious.weight", torch.zeros(1)))
    # float64 in, float64 out (renames only).
    _, as64 = cls.convert_reference({k: v.double() for k, v in sd.items()})
    assert all(v.dtype == torch.float64 for v in as64.values())
