"""Task losses: the 2018 loss, cross-entropy, and the loss-term hook."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import avel
from avel.tasks import SupervisedTask, segment_losses

from _coredata import small_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return small_folder(tmp_path_factory)


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



# --- the model contract seen from the tasks -----------------------------------------------------------

def _tiny_batch(B=4, T=10, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, C, (B, T), generator=g)
    return {"audio": torch.rand(B, T, 12, generator=g), "visual": torch.rand(B, T, 3, 3, 8, generator=g),
            "target": torch.nn.functional.one_hot(cls, C).float(),
            "video_label": torch.nn.functional.one_hot(cls[:, 0], C).float(), "index": torch.arange(B)}


def test_weak_evaluation_reports_the_repository_rule_beside_the_model_rule():
    """cmbs_weak decides with the corrected gate rule; the repository's degenerate rule is scored too."""
    from avel.models import build_model
    from avel.tasks import WeakTask

    model = build_model("cmbs_weak", audio_dim=12, visual_dim=8, grid=(3, 3), num_classes=5, d_model=16).eval()
    task = WeakTask()
    batch = _tiny_batch()
    with torch.no_grad():
        pred = task.predict(model, batch)
    repo = pred["repository_scores"].argmax(-1)                        # [B, T]
    assert (repo == repo[:, :1]).all()                                  # constant along time: no localization
    result = task.score(pred, [f"c{i}" for i in range(4)] + ["background"])
    assert {"accuracy", "video_accuracy", "repository_rule_accuracy"} <= set(result)
    by_hand = float((repo == batch["target"].argmax(-1).numpy()).mean())
    assert result["repository_rule_accuracy"] == pytest.approx(by_hand)


def test_model_loss_terms_replace_the_task_loss_and_take_recipe_weights():
    from avel.models import build_model

    model = build_model("psp", audio_dim=12, visual_dim=8, grid=(3, 3), num_classes=5).eval()
    batch = _tiny_batch()
    plain = SupervisedTask(loss="ce").loss_terms(model, batch)
    assert set(plain) == {"cls", "avps"}
    raw = model.loss_terms(model(batch["audio"], batch["visual"]), batch, "supervised")
    torch.testing.assert_close(plain["avps"], 100 * raw["avps"])        # the class's weight (LAMBDA = 100)
    reweighted = SupervisedTask(loss="ce", loss_weights={"avps": 1.0}).loss_terms(model, batch)
    torch.testing.assert_close(reweighted["avps"], raw["avps"])
    torch.testing.assert_close(reweighted["cls"], raw["cls"])


def test_check_model_refuses_the_wrong_task_and_unknown_weights():
    from avel.models import model_class
    from avel.tasks import WeakTask, check_model

    with pytest.raises(ValueError, match="trains the supervised task, not 'weak'"):
        check_model(WeakTask(), model_class("cmbs"))
    with pytest.raises(ValueError, match="not loss terms of 'psp'"):
        check_model(SupervisedTask(loss_weights={"nope": 1.0}), model_class("psp"))
    check_model(SupervisedTask(loss_weights={"avps": 10.0}), model_class("psp"))


@pytest.mark.parametrize("name", [m for m in avel.available_models()
                                  if "weak" in getattr(avel.models.model_class(m), "tasks", ())])
def test_every_weak_model_gives_video_scores(name):
    from avel.models import build_model
    from avel.tasks import WeakTask

    kwargs = dict(audio_dim=12, visual_dim=8, grid=(3, 3), num_classes=5)
    model = build_model(name, **kwargs).eval()
    with torch.no_grad():
        pred = WeakTask().predict(model, _tiny_batch())
    assert pred["video_scores"].shape == (4, 5) and np.isfinite(pred["video_scores"]).all()
    np.testing.assert_allclose(pred["video_scores"].sum(-1), 1.0, rtol=1e-5)
