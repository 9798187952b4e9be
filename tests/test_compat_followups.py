"""load_original on the follow-up repositories' checkpoint files, written in each repository's format.

PSP ships whole pickled modules (legacy, cuda:0); the others are nn.DataParallel state dicts
(``module.`` keys, float64) that the test writes from weights_spec.json as each README says.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avel.compat import OriginalCheckpointError, load_original, read_original
from avel.models import avsdn, cmbs, cmran, cpsp, psp  # noqa: F401  (registers the follow-up models)

# variant -> (kind, prediction array, (avel output, fixture array, reshape of the fixture))
VARIANTS = {
    "psp": ("psp", "pred_segment", ("logits", "out", None)),
    "psp_weak": ("psp_weak", "pred_segment", ("logits", "score", None)),
    "cpsp": ("cpsp", "pred_segment", ("event_logits", "event_logits", None)),
    "cpsp_weak": ("cpsp_weak", "pred_segment", ("event_logits", "event_logits", None)),
    "avsdn": ("avsdn", "fully_pred_segment", ("event_logits", "fully_event_logits", None)),
    "cmbs": ("cmbs", "pred_segments", ("event_logits", "is_event_scores", "TB1")),
    "cmbs_weak": ("cmbs_weak", "ALT_pred_segments_gate_gt_0p5", ("raw_logits", "raw_logits", None)),
    "cmran": ("cmran", "pred_segments", ("event_logits", "is_event_scores", "TB1")),
    "cmran_weak": ("cmran_weak", "pred_segments", ("event_logits", "is_event_scores", None)),
}
WHOLE = {"psp": "PSP_fully_whole_legacy_cuda.pt", "psp_weak": "PSP_weakly_whole_legacy_cuda.pt"}


@pytest.fixture(scope="module")
def inputs(followups):
    with np.load(followups / "inputs.npz") as z:
        return torch.from_numpy(z["audio"]), torch.from_numpy(z["visual"])


def write_reference_file(followups, regen, variant: str, folder):
    """The file the variant's repository writes (the shipped one for PSP)."""
    if variant in WHOLE:
        return followups / variant / WHOLE[variant]
    spec_path = followups / variant / "weights_spec.json"
    fmt = json.loads(spec_path.read_text())["format"]
    sd = regen.state_dict_from_spec(spec_path)
    path = folder / f"model_epoch_1_top1_0.000_task_{variant}_best_model.pth.tar"
    legacy = fmt["serialization"].startswith("legacy")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loaded_reference_file_reproduces_fixture(followups, regen, inputs, tmp_path, variant):
    kind, pred_key, (mine, theirs, layout) = VARIANTS[variant]
    path = write_reference_file(followups, regen, variant, tmp_path)
    model, card = load_original(path, kind=kind)
    assert not model.training and card.source["kind"] == kind and card.model == kind
    assert card.task == ("weak" if kind.endswith("_weak") else "supervised") and card.outputs
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with np.load(followups / variant / "outputs.npz") as z:
        expected = {k: z[k] for k in z.files}
    with torch.no_grad():
        out = model(*inputs)
    np.testing.assert_array_equal(out["segment_scores"].argmax(-1).numpy(), expected[pred_key])
    ref = expected[theirs]
    if layout == "TB1":
        ref = ref[:, :, 0].T
    np.testing.assert_allclose(out[mine].numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["cmran", "psp_weak"])
def test_float64_on_request(followups, regen, inputs, tmp_path, variant):
    kind, pred_key, (mine, theirs, layout) = VARIANTS[variant]
    path = write_reference_file(followups, regen, variant, tmp_path)
    model, _ = load_original(path, kind=kind, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with np.load(followups / variant / "outputs.npz") as z:
        ref = z[theirs]
    ref = ref[:, :, 0].T if layout == "TB1" else ref
    with torch.no_grad():
        out = model(*(x.double() for x in inputs))
    tol = 1e-9 if json.loads((followups / variant / "weights_spec.json").read_text())["dtype"] == "float64" else 1e-5
    np.testing.assert_allclose(out[mine].numpy(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("variant", sorted(WHOLE))
def test_whole_module_says_its_kind(followups, variant):
    ckpt = read_original(followups / variant / WHOLE[variant])
    assert ckpt.kind == variant and ckpt.format == "legacy" and ckpt.locations == ("cuda:0",)
    assert ckpt.class_name == f"{'fully' if variant == 'psp' else 'weakly'}_model.psp_net"
    assert load_original(followups / variant / WHOLE[variant]).card.source["kind"] == variant


@pytest.mark.parametrize("variant", ["avsdn", "cmbs", "cmbs_weak"])
def test_state_dict_kind_from_keys(followups, regen, tmp_path, variant):
    """A state dict whose keys fit exactly one registered model needs no kind."""
    path = write_reference_file(followups, regen, variant, tmp_path)
    ckpt = read_original(path)
    assert ckpt.kind == "state_dict" and ckpt.dtypes == ("float64",)
    assert all(k.startswith("module.") for k in ckpt.state_dict)
    assert load_original(path).card.source["kind"] == variant


@pytest.mark.parametrize("variant,others", [("cmran", "cmran_weak"), ("cpsp", "cpsp_weak")])
def test_ambiguous_state_dict_asks_for_kind(followups, regen, tmp_path, variant, others):
    path = write_reference_file(followups, regen, variant, tmp_path)
    with pytest.raises(OriginalCheckpointError, match=rf"{path.name}.*several.*{variant}.*{others}.*kind="):
        load_original(path)


def test_wrong_parameter_shape_names_file_and_key(followups, regen, tmp_path):
    sd = regen.state_dict_from_spec(followups / "cmbs" / "weights_spec.json")
    key = next(k for k in sd if k.endswith("weight") and sd[k].dim() == 2)
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1], dtype=sd[key].dtype)
    path = tmp_path / "bad_shape.pth.tar"
    torch.save(sd, path)
    with pytest.raises(OriginalCheckpointError, match=r"bad_shape\.pth\.tar.*cmbs"):
        load_original(path, kind="cmbs")
