"""The segment-model contract, over every registered model, and the official A+V-att / DMRN math."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import avel
from avel.models import build_model, model_arguments
from avel.models.attention import AudioGuidedAttention
from avel.models.registry import model_class
from avel.tasks import SupervisedTask, WeakTask

SEGMENT_MODELS = [m for m in avel.available_models() if "segment_scores" in model_class(m).outputs]
ATTENTION_MODELS = {"visual_att", "av_att", "dmrn"}
# Small hyper-parameters where a model has them (a model missing here is tested at its defaults).
SMALL = {"hidden": 16, "att_hidden": 16, "head_hidden": 16, "d_model": 16, "ff_dim": 32, "channel_hidden": 16,
         "spatial_hidden": 16, "bottleneck": 8}


def tasks_of(name: str) -> tuple[str, ...]:
    return getattr(model_class(name), "tasks", ("supervised", "weak"))


pytestmark = pytest.mark.usefixtures("one_thread")


def small_kwargs(name: str, **dims) -> dict:
    allowed = model_arguments(name)
    return {**{k: v for k, v in SMALL.items() if k in allowed}, **dims}


def batch(B=3, T=10, Da=12, grid=(3, 3), Dv=8, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.rand(B, T, Da, generator=g)
    visual = torch.rand(B, T, *grid, Dv, generator=g)
    cls = torch.randint(0, C, (B, T), generator=g)
    target = F.one_hot(cls, C).float()
    video = F.one_hot(torch.randint(0, C, (B,), generator=g), C).float()
    return {"audio": audio, "visual": visual, "target": target, "video_label": video}


def test_registry_lists_the_paper_models():
    assert {"audio", "visual", "visual_att", "av", "av_att", "dmrn", "cml"} <= set(avel.available_models())
    assert avel.available_models() == sorted(avel.available_models())


@pytest.mark.parametrize("name", SEGMENT_MODELS)
@pytest.mark.parametrize("T", [10, 4])
def test_output_contract(name, T):
    dims = dict(audio_dim=12, visual_dim=8, grid=(3, 3), num_classes=5)
    model = build_model(name, **small_kwargs(name, **dims)).eval()
    b = batch(B=2, T=T, Da=12, grid=(3, 3), Dv=8, C=5)
    with torch.no_grad():
        out = model(b["audio"], b["visual"])
    assert tuple(out) == model_class(name).outputs or set(out) == set(model_class(name).outputs)
    assert out["segment_scores"].shape == (2, T, 5)
    assert torch.isfinite(out["segment_scores"]).all()
    shapes = {"logits": (2, T, 5), "event_logits": (2, T), "class_logits": (2, 4), "video_logits": (2, 5)}
    for key, shape in shapes.items():
        if key in out:
            assert out[key].shape == shape, key
    if name in ATTENTION_MODELS:
        assert "attention" in out
    if "attention" in out:
        att = out["attention"]
        assert att.shape == (2, T, 3, 3)
        assert (att >= 0).all()
        torch.testing.assert_close(att.sum(dim=(2, 3)), torch.ones(2, T))


@pytest.mark.parametrize("name", SEGMENT_MODELS)
def test_segments_are_independent_of_batch_neighbours(name):
    model = build_model(name, **small_kwargs(name, audio_dim=12, visual_dim=8, grid=(3, 3), num_classes=5)).eval()
    b = batch(B=3, Da=12, Dv=8, C=5)
    with torch.no_grad():
        full = model(b["audio"], b["visual"])["segment_scores"]
        one = model(b["audio"][1:2], b["visual"][1:2])["segment_scores"]
    torch.testing.assert_close(full[1:2], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEGMENT_MODELS)
@pytest.mark.parametrize("task", [SupervisedTask(loss="softmax_mlsm"), SupervisedTask(loss="ce"),
                                  WeakTask(loss="softmax_mlsm"), WeakTask(loss="ce")],
                         ids=["sup-mlsm", "sup-ce", "weak-mlsm", "weak-ce"])
def test_losses_finite_and_one_step_lowers_them(name, task):
    if task.name not in tasks_of(name):
        pytest.skip(f"{name} is a {'/'.join(tasks_of(name))} model")
    if hasattr(model_class(name), "loss_terms") and task.loss != "ce":
        pytest.skip("a model with its own loss terms ignores the task loss kind (tested once, with ce)")
    torch.manual_seed(1)
    # eval(): dropout off, so the step's effect is measured on the same function (PSP's AVPS term jumps
    # when a cosine crosses 0, and fresh dropout masks can cross it).
    model = build_model(name, **small_kwargs(name, audio_dim=12, visual_dim=8, grid=(3, 3), num_classes=5)).eval()
    b = batch(B=4, Da=12, Dv=8, C=5)
    per_video = task.losses(model, b)
    assert per_video.shape == (4,)
    assert torch.isfinite(per_video).all() and (per_video > 0).all()
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if task.loss == "ce" else 1.0)
    before = per_video.mean()
    opt.zero_grad()
    before.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    with torch.no_grad():
        after = task.losses(model, b).mean()
    assert after < before


@pytest.mark.parametrize("name", avel.available_models())
def test_constructors_are_keyword_only(name):
    cls = model_class(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    with pytest.raises(TypeError):
        cls(128, 512)
    with pytest.raises(TypeError):
        AudioGuidedAttention(128, 512)


@pytest.mark.parametrize("name", avel.available_models())
def test_build_model_rejects_unknown_kwargs(name):
    with pytest.raises(TypeError, match="not_an_argument"):
        build_model(name, not_an_argument=3)
    with pytest.raises(KeyError, match="no_such_model"):
        build_model("no_such_model")


@pytest.mark.parametrize("name", SEGMENT_MODELS)
@pytest.mark.parametrize("grid", [(7, 7), (3, 3)])
def test_non_default_dims(name, grid):
    dims = dict(audio_dim=64, visual_dim=1280, grid=grid, num_classes=7)
    model = build_model(name, **small_kwargs(name, **dims)).eval()
    b = batch(B=2, T=5, Da=64, grid=grid, Dv=1280, C=7)
    with torch.no_grad():
        out = model(b["audio"], b["visual"])
    assert out["segment_scores"].shape == (2, 5, 7)
    if "attention" in out:
        assert out["attention"].shape == (2, 5, *grid)
    # A list grid (as JSON gives it back) builds the same model.
    again = build_model(name, **small_kwargs(name, **{**dims, "grid": list(grid)}))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    # Wrong input dims fail loudly rather than silently.
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 5, 128), b["visual"]) if name != "visual" else model(b["audio"], torch.rand(2, 5, *grid, 512))


def test_default_dims_are_the_official_ones():
    args = model_arguments("av_att")
    assert (args["audio_dim"], args["visual_dim"], tuple(args["grid"]), args["num_classes"]) == (128, 512, (7, 7), 29)
    assert (args["hidden"], args["att_hidden"], args["head_hidden"]) == (128, 512, 64)


# --- attention: the official broadcast, and its fast path ---------------------------------------

def _reference_attention(att: AudioGuidedAttention, audio, visual):
    """The official att_Net arithmetic written out with plain ops."""
    B, T, H, W, Dv = visual.shape
    V = visual.reshape(B * T, H * W, Dv)
    v = F.relu(F.linear(V, att.affine_video.weight, att.affine_video.bias))
    a = F.relu(F.linear(audio.reshape(B * T, -1), att.affine_audio.weight, att.affine_audio.bias))
    content = F.linear(v, att.affine_v.weight) + F.linear(a, att.affine_g.weight).unsqueeze(2)
    z = F.linear(torch.tanh(content), att.affine_h.weight).squeeze(2)
    alpha = F.softmax(z, dim=-1)
    return torch.bmm(alpha.unsqueeze(1), V).view(B, T, Dv), alpha.view(B, T, H, W)


def test_attention_matches_reference_forward_and_backward():
    torch.manual_seed(0)
    att = AudioGuidedAttention(audio_dim=6, visual_dim=10, hidden=12, regions=49)
    ref = AudioGuidedAttention(audio_dim=6, visual_dim=10, hidden=12, regions=49)
    ref.load_state_dict(att.state_dict())
    audio = torch.rand(3, 10, 6)
    visual = torch.rand(3, 10, 7, 7, 10, requires_grad=True)       # 1470 region rows: several chunks
    visual_ref = visual.detach().clone().requires_grad_(True)
    out, alpha = att(audio, visual)
    out_r, alpha_r = _reference_attention(ref, audio, visual_ref)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha, alpha_r, rtol=1e-5, atol=1e-6)
    w = torch.rand_like(out)
    ((out * w).sum() + (alpha ** 2).sum()).backward()
    ((out_r * w).sum() + (alpha_r ** 2).sum()).backward()
    torch.testing.assert_close(visual.grad, visual_ref.grad, rtol=1e-4, atol=1e-6)
    for (n, p), (_, q) in zip(att.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        out_ng, alpha_ng = att(audio, visual)
    torch.testing.assert_close(out_ng, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha_ng, alpha_r, rtol=1e-5, atol=1e-6)


# --- the official models reproduce the reference outputs ------------------------------------------

def _official_rename(key: str) -> str:
    if key.startswith("affine_"):
        return "attention." + key
    if key.startswith(("L1.", "L2.")):
        return "head." + key
    return key


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return dict(np.load(fixtures_dir / "original" / "io.npz"))


def test_av_att_reproduces_original_outputs(fixtures_dir, io):
    state = torch.load(fixtures_dir / "original" / "AV_att_state_dict.pt", weights_only=True)
    model = build_model("av_att")
    missing = model.load_state_dict({_official_rename(k): v for k, v in state.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(io["audio"]), torch.from_numpy(io["visual"]))
    probs = out["logits"].softmax(-1).numpy()
    np.testing.assert_allclose(probs, io["AV_att_probs"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["attention"].numpy(), io["AV_att_attention"], rtol=0, atol=1e-5)
    # Flat probabilities (untrained weights): the comparison is meaningful only if not all equal.
    assert np.ptp(io["AV_att_attention"]) > 1e-3


def test_dmrn_reproduces_original_outputs(fixtures_dir, io):
    # The only DMRN weights are a whole legacy pickle: read its tensors with the safe reader.
    from avel.compat.original import read_original

    state = read_original(fixtures_dir / "original" / "DMRN_whole_legacy.pt").state_dict
    model = build_model("dmrn")
    model.load_state_dict({_official_rename(k) if k.startswith("affine_") else k: v for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(io["audio"]), torch.from_numpy(io["visual"]))
    np.testing.assert_allclose(out["logits"].softmax(-1).numpy(), io["DMRN_probs"], rtol=0, atol=1e-5)
