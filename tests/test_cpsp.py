"""CPSP (supervised and weak) against the reference fixtures of followups/cpsp and followups/cpsp_weak.

The reference runs in float64: ``model.double()`` is compared at 1e-10, the float32 model at 1e-5.
Weights: regen_weights.py, "module." stripped (as avel.compat does), then convert_reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avel.models import build_model, cpsp

from _support.followups import assert_convert_refuses, eval_loss_before_and_after_training, forward_recording, load_npz

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {False: 1e-5, True: 1e-10}


@pytest.fixture(scope="module")
def inputs(followups):
    return load_npz(followups / "inputs.npz")


def reference_state_dict(regen, followups, variant):
    sd = regen.state_dict_from_spec(followups / variant / "weights_spec.json")
    assert all(k.startswith("module.") for k in sd)
    return {k[len("module."):]: v for k, v in sd.items()}


def build(cls, followups, regen, variant, double):
    kwargs, sd = cls.convert_reference(reference_state_dict(regen, followups, variant))
    model = cls(**kwargs)
    if double:
        model.double()                   # before loading: the exact float64 weights, not float32-rounded
    model.load_state_dict(sd)            # strict
    return model.eval()


def run(model, inputs, double, b8=False, capture=()):
    dtype = torch.float64 if double else torch.float32
    suffix = "_b8" if b8 else ""
    audio = torch.from_numpy(inputs["audio" + suffix]).to(dtype)
    visual = torch.from_numpy(inputs["visual" + suffix]).to(dtype)
    seen = {}
    out = forward_recording(model, audio, visual, capture, lambda name, args, output: seen.setdefault(name, output))
    return out, seen


def close(actual, expected, atol):
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected.astype(np.float64), rtol=0, atol=atol)


def accuracy_percent(pred, labels):
    return (pred == labels.argmax(-1)).mean() * 100


def supervised_batch(labels, dtype=torch.float64):
    target = torch.from_numpy(labels).to(dtype)
    return {"target": target, "video_label": target.amax(1), "index": torch.arange(target.shape[0])}


def weak_batch(labels_video, dtype=torch.float64):
    """The 28-way reference label plus avel's background column (0 for these event videos)."""
    lv = torch.from_numpy(labels_video).to(dtype)
    video = torch.cat([lv, (lv.sum(-1, keepdim=True) == 0).to(dtype)], dim=-1)
    return {"video_label": video, "index": torch.arange(lv.shape[0])}


# --- supervised CPSP -----------------------------------------------------------------------------

@pytest.mark.parametrize("double", [False, True])
def test_cpsp_outputs_and_intermediates(followups, regen, inputs, double):
    ref = load_npz(followups / "cpsp" / "outputs.npz")
    atol = TOL[double]
    model = build(cpsp.CPSP, followups, regen, "cpsp", double)
    out, seen = run(model, inputs, double, capture=("audio_proj", "attention", "visual_proj", "lstm_audio",
                                                    "lstm_video", "psp"))
    assert set(out) == set(cpsp.CPSP.outputs)
    close(out["event_logits"], ref["event_logits"], atol)
    close(out["class_logits"], ref["category_logits"], atol)
    close(out["avps"], ref["avps"], atol)
    close(out["fusion"], ref["fusion"], atol)
    close(out["attention"], ref["mid_attention_map"], atol)
    pred = out["segment_scores"].argmax(-1).numpy()
    np.testing.assert_array_equal(pred, ref["pred_segment"])
    np.testing.assert_array_equal(out["class_logits"].argmax(-1).numpy(), ref["event_class"])
    assert accuracy_percent(pred, ref["labels"]) == pytest.approx(ref["accuracy"], abs=1e-12)
    fa = seen["audio_proj"]
    close(fa, ref["mid_fa_fea"], atol)
    close(seen["attention"][0], ref["mid_video_t_attended"], atol)
    att = model.attention
    visual = torch.from_numpy(inputs["visual"]).to(fa.dtype)
    with torch.no_grad():       # z before the softmax, from the attention's own sub-modules
        s = att.affine_v(torch.relu(att.affine_video(visual.reshape(30, 49, -1))))
        g = att.affine_g(torch.relu(att.affine_audio(fa.reshape(30, -1))))
        z = att.affine_h(torch.tanh(s + g[:, :, None])).view(3, 10, 7, 7)
    close(z, ref["mid_attention_logits"], atol)
    close(seen["visual_proj"], ref["mid_video_t_fv"], atol)
    close(seen["lstm_audio"][0], ref["mid_lstm_audio"], atol)
    close(seen["lstm_video"][0], ref["mid_lstm_video"], atol)
    close(seen["psp"][0], ref["mid_final_v_fea"], atol)
    close(seen["psp"][1], ref["mid_final_a_fea"], atol)


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("fixture", ["outputs", "loss_b8"])
def test_cpsp_loss_terms(followups, regen, inputs, double, fixture):
    ref = load_npz(followups / "cpsp" / f"{fixture}.npz")
    atol = TOL[double]
    model = build(cpsp.CPSP, followups, regen, "cpsp", double)
    out, _ = run(model, inputs, double, b8=fixture == "loss_b8")
    if fixture == "loss_b8":
        for mine, theirs in (("event_logits", "event_logits"), ("class_logits", "category_logits"),
                             ("avps", "avps"), ("fusion", "fusion")):
            close(out[mine], ref[theirs], atol)
        np.testing.assert_array_equal(out["segment_scores"].argmax(-1).numpy(), ref["pred_segment"])
    batch = supervised_batch(ref["labels"], out["fusion"].dtype)
    events = cpsp.segment_events(batch["target"])
    close(events, ref["labels_BCE"], 0)
    np.testing.assert_array_equal(cpsp.video_event_class(batch["target"]).numpy(), ref["labels_event"])
    terms = model.loss_terms(out, batch, "supervised")
    B = ref["labels"].shape[0]
    assert set(terms) == set(cpsp.CPSP.loss_weights) and all(t.shape == (B,) for t in terms.values())
    for name in ("is_event", "event_class", "avps", "vcon"):
        close(terms[name].mean(), ref[f"loss_{name}"], atol)
    # The segment term: the reference function reproduces the fixture; the hook uses the fixed form.
    scon_ref = cpsp.segment_contrastive_loss_reference(out["fusion"], events)
    close(scon_ref, ref["loss_scon"], atol)
    close(terms["scon"], np.full(B, cpsp.segment_contrastive_loss(out["fusion"], events).item()), 0)
    w = cpsp.CPSP.loss_weights
    total = sum(w[k] * terms[k].mean() for k in ("is_event", "event_class", "avps", "vcon")) + w["scon"] * scon_ref
    close(total, ref["loss_total"], atol * 10)     # total includes 100 * avps
    with pytest.raises(ValueError):
        model.loss_terms(out, batch, "weak")


def test_cpsp_functions(followups):
    ref = load_npz(followups / "cpsp" / "functions.npz")
    t = {k: torch.from_numpy(v) for k, v in ref.items() if v.dtype != np.float32}
    np.testing.assert_array_equal(cpsp.cpsp_segment_scores(t["event_logits"], t["category_logits"]).argmax(-1)
                                  .numpy(), ref["pred_segment"])
    assert accuracy_percent(ref["pred_segment"], ref["labels"]) == pytest.approx(ref["accuracy"], abs=1e-12)
    model = cpsp.CPSP()
    out = {"event_logits": t["event_logits"], "class_logits": t["category_logits"], "avps": t["avps"],
           "fusion": t["fusion"]}
    batch = supervised_batch(ref["labels"])
    events = cpsp.segment_events(batch["target"])
    close(events / (events.sum(-1, keepdim=True) + 1e-6), ref["soft_labels"], 1e-15)
    np.testing.assert_array_equal(cpsp.video_event_class(batch["target"]).numpy(), ref["labels_event"])
    terms = model.loss_terms(out, batch, "supervised")
    for name in ("is_event", "event_class", "avps", "vcon"):
        close(terms[name].mean(), ref[f"loss_{name}"], 1e-10)
    close(cpsp.segment_contrastive_loss_reference(t["fusion"], events), ref["loss_scon"], 1e-10)


def test_segment_contrastive_fixed_form():
    """The fixed term by an explicit loop; it depends on the features, the reference does not."""
    g = torch.Generator().manual_seed(1)
    fusion = torch.randn(4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    event = torch.tensor([[1, 1, 0, 0, 1, 0], [0] * 6, [1] * 6, [0, 1, 0, 0, 0, 0]], dtype=torch.float64)
    t = 0.6
    f = F.normalize(fusion.detach(), dim=-1)
    videos = []
    for b in range(4):
        e = event[b].bool()
        if not e.any():
            continue
        n_bg = (~e).sum().item()
        anchors = []
        for i in torch.nonzero(e).flatten().tolist():
            sim = torch.exp(f[b] @ f[b, i] / t)
            pos = sim[e].sum()
            neg = sim[~e].sum() / (n_bg + 1e-12)
            anchors.append(-torch.log(pos / (pos + neg + 1e-12) + 1e-12))
        videos.append(torch.stack(anchors).mean())
    expected = torch.stack(videos).mean()
    loss = cpsp.segment_contrastive_loss(fusion, event)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, fusion)
    assert grad.abs().max() > 1e-3
    ref = cpsp.segment_contrastive_loss_reference(fusion, event)
    (grad_ref,) = torch.autograd.grad(ref, fusion)
    assert grad_ref.abs().max() < 1e-9              # the reference bug: no useful gradient


def test_cpsp_background_video_is_not_class_zero():
    """A background-only video: no class term, and its own group (C-1) in the video contrastive term."""
    model = cpsp.CPSP(audio_dim=6, visual_dim=10, grid=(2, 2), num_classes=5, embed_dim=8, proj_hidden=9,
                      hidden=4, att_hidden=12)
    target = torch.zeros(2, 3, 5)
    target[0, :, -1] = 1
    target[1, :, 0] = 1
    out = model(torch.rand(2, 3, 6), torch.rand(2, 3, 2, 2, 10))
    terms = model.loss_terms(out, {"target": target, "video_label": target.amax(1), "index": torch.arange(2)},
                             "supervised")
    assert terms["event_class"][0] == 0 and terms["event_class"][1] > 0
    assert all(torch.isfinite(t).all() for t in terms.values())


# --- weak CPSP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("double", [False, True])
def test_cpsp_weak_outputs(followups, regen, inputs, double):
    ref = load_npz(followups / "cpsp_weak" / "outputs.npz")
    atol = TOL[double]
    model = build(cpsp.CPSPWeak, followups, regen, "cpsp_weak", double)
    out, seen = run(model, inputs, double, capture=("attention", "lstm_audio", "lstm_video", "psp"))
    assert set(out) == set(cpsp.CPSPWeak.outputs)
    close(out["fusion"], ref["fusion"], atol)
    close(out["event_logits"], ref["event_logits"], atol)
    close(out["class_logits"], ref["category_logits"], atol)
    close(out["video_prob"], ref["predict_video_labels"], atol)
    close(out["pooled_logits"], ref["mid_video_logits_max"], atol)
    fused = torch.sigmoid(out["event_logits"])[..., None] * out["class_logits"][:, None, :]
    close(fused, ref["mid_fused_logits"], atol)
    close(out["attention"], ref["mid_attention_map"], atol)
    close(seen["lstm_audio"][0], ref["mid_lstm_audio"], atol)
    close(seen["lstm_video"][0], ref["mid_lstm_video"], atol)
    close(seen["psp"][0], ref["mid_final_v_fea"], atol)
    close(seen["psp"][1], ref["mid_final_a_fea"], atol)
    pred = out["segment_scores"].argmax(-1).numpy()
    np.testing.assert_array_equal(pred, ref["pred_segment"])
    np.testing.assert_array_equal(out["class_logits"].argmax(-1).numpy(), ref["event_class"])
    assert accuracy_percent(pred, ref["labels_segment"]) == pytest.approx(ref["accuracy"], abs=1e-12)
    # Losses at B = 3: the class term (reference form) and the derived video classes.
    batch = weak_batch(ref["labels_video"], out["fusion"].dtype)
    np.testing.assert_array_equal(cpsp.video_class(batch["video_label"]).numpy(), ref["event_class_flag"])
    close(cpsp.multilabel_soft_margin_reference(out["video_prob"], batch["video_label"][:, :-1]).mean(),
          ref["loss_event_class"], atol)
    # The reference cannot compute its video term at B = 3 (4 nearest of 3 videos); avel takes the 3
    # nearest, which include the video itself (1e12), so the term is 0 instead of an error.
    with pytest.raises(RuntimeError, match=str(ref["loss_vcon_error"])):
        torch.topk(torch.zeros(3, 3), 4, dim=1, largest=False)
    terms = model.loss_terms(out, batch, "weak")
    assert set(terms) == set(cpsp.CPSPWeak.loss_weights)
    assert terms["vcon"].shape == (3,) and (terms["vcon"] == 0).all()
    with pytest.raises(ValueError):
        model.loss_terms(out, batch, "supervised")


@pytest.mark.parametrize("double", [False, True])
def test_cpsp_weak_loss_b8(followups, regen, inputs, double):
    ref = load_npz(followups / "cpsp_weak" / "loss_b8.npz")
    atol = TOL[double]
    model = build(cpsp.CPSPWeak, followups, regen, "cpsp_weak", double)
    out, _ = run(model, inputs, double, b8=True)
    for mine, theirs in (("fusion", "fusion"), ("event_logits", "event_logits"), ("class_logits", "category_logits"),
                         ("video_prob", "predict_video_labels")):
        close(out[mine], ref[theirs], atol)
    np.testing.assert_array_equal(out["segment_scores"].argmax(-1).numpy(), ref["pred_segment"])
    batch = weak_batch(ref["labels_video"], out["fusion"].dtype)
    np.testing.assert_array_equal(cpsp.video_class(batch["video_label"]).numpy(), ref["event_class_flag"])
    terms = model.loss_terms(out, batch, "weak")
    assert all(t.shape == (8,) for t in terms.values())
    close(terms["vcon"].mean(), ref["loss_vcon"], atol)
    ec_ref = cpsp.multilabel_soft_margin_reference(out["video_prob"], batch["video_label"][:, :-1]).mean()
    close(ec_ref, ref["loss_event_class"], atol)
    w = cpsp.CPSPWeak.loss_weights
    close(w["event_class"] * ec_ref + w["vcon"] * terms["vcon"].mean(), ref["loss_total"], atol)
    # The fixed class term scores the pooled logits, not their softmax.
    expected = F.multilabel_soft_margin_loss(out["pooled_logits"], batch["video_label"][:, :-1], reduction="none")
    torch.testing.assert_close(terms["event_class"], expected)


def test_cpsp_weak_functions(followups):
    ref = load_npz(followups / "cpsp_weak" / "functions.npz")
    t = {k: torch.from_numpy(v) for k, v in ref.items()}
    np.testing.assert_array_equal(cpsp.cpsp_segment_scores(t["event_logits"], t["category_logits"]).argmax(-1)
                                  .numpy(), ref["pred_segment"])
    assert accuracy_percent(ref["pred_segment"], ref["labels_segment"]) == pytest.approx(ref["accuracy"], abs=1e-12)
    close(torch.softmax(t["category_logits"], -1), ref["probs"], 1e-15)
    close(cpsp.multilabel_soft_margin_reference(t["probs"], t["labels_video"]).mean(), ref["loss_event_class"], 1e-12)
    batch = weak_batch(ref["labels_video"])
    classes = cpsp.video_class(batch["video_label"])
    np.testing.assert_array_equal(classes.numpy(), ref["event_class_flag"])
    model = cpsp.CPSPWeak()
    vcon = cpsp.video_contrastive_loss(t["fusion"], classes, model.vcon_margin, model.vcon_negatives)
    close(vcon.mean(), ref["loss_vcon"], 1e-12)


# --- contract ------------------------------------------------------------------------------------

SMALL = dict(audio_dim=6, visual_dim=10, grid=(2, 3), num_classes=5, embed_dim=8, proj_hidden=9, hidden=4,
             att_hidden=12, head_hidden=7)


def random_batch(B=8, T=4, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(B) % (C - 1)
    on = torch.rand(B, T, generator=g) < 0.6
    on[:, 0] = True
    on[:, -1] = False
    idx = torch.where(on, classes[:, None], torch.full((B, T), C - 1))
    target = F.one_hot(idx, C).float()
    return {"audio": torch.rand(B, T, 6, generator=g), "visual": torch.rand(B, T, 2, 3, 10, generator=g),
            "target": target, "video_label": F.one_hot(classes, C).float(), "index": torch.arange(B)}


@pytest.mark.parametrize("name,task", [("cpsp", "supervised"), ("cpsp_weak", "weak")])
def test_trains_and_contract(name, task):
    torch.manual_seed(0)
    model = build_model(name, **SMALL)
    batch = random_batch()
    out = model(batch["audio"], batch["visual"])
    assert set(out) == set(type(model).outputs)
    assert out["segment_scores"].shape == (8, 4, 5) and out["attention"].shape == (8, 4, 2, 3)
    one = model(batch["audio"][:1], batch["visual"][:1])            # B = 1 keeps its batch axis
    assert one["event_logits"].shape == (1, 4) and one["class_logits"].shape == (1, 4)

    def total():
        terms = model.loss_terms(model(batch["audio"], batch["visual"]), batch, task)
        assert all(t.shape == (8,) for t in terms.values())
        return sum(model.loss_weights[k] * t.mean() for k, t in terms.items())

    start, end = eval_loss_before_and_after_training(model, total)
    assert end < start


@pytest.mark.parametrize("cls,variant", [(cpsp.CPSP, "cpsp"), (cpsp.CPSPWeak, "cpsp_weak")])
def test_convert_reference_checks(followups, regen, cls, variant):
    sd = reference_state_dict(regen, followups, variant)
    kwargs, converted = cls.convert_reference(sd)
    assert kwargs["num_classes"] == 29 and kwargs["grid"] == (7, 7)
    assert len(converted) == len(sd) - len(cpsp.CPSP_UNUSED_REFERENCE_KEYS)
    assert all(v.dtype == torch.float64 for v in converted.values())
    assert cls.reference_classes == ()
    assert_convert_refuses(cls, sd, missing="event_classifier.0.bias", wrong=("psp.a_fc.weight", torch.zeros(256, 255, dtype=torch.float64)),
                           extra=("L3.weight", torch.zeros(64, 256, dtype=torch.float64)))
