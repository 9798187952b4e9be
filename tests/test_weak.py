"""Weakly supervised (MIL) task: pooling, loss, background videos, selection, and a short run."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from avel import load
from avel.cli import main
from avel.config import apply_overrides, recipe
from avel.data.datasets import AVEData, Batches, ConcatRows, SegmentRows
from avel.data.errors import DataError
from avel.engine.checkpoint import read_card
from avel.engine.evaluate import evaluate
from avel.engine.train import train
from avel.models import build_model
from avel.models.heads import scored
from avel.tasks import WeakTask, build_task

from _coredata import quick_config, synth

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("weak") / "ave", videos=60, background_videos=12)


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given: isolates the task arithmetic."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, audio, visual):
        return scored(self.logits)


def _batch(B=3, T=4, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, C, generator=g) * 2
    video = torch.nn.functional.one_hot(torch.randint(0, C, (B,), generator=g), C).float()
    target = torch.nn.functional.one_hot(torch.randint(0, C, (B, T), generator=g), C).float()
    return logits, {"audio": torch.zeros(B, T, 1), "visual": torch.zeros(B, T, 1, 1, 1), "target": target,
                    "video_label": video, "index": torch.arange(B)}


# --- pooling and loss --------------------------------------------------------------------------------

def test_video_prediction_is_softmax_of_max_over_time():
    logits, batch = _batch()
    with torch.no_grad():
        out = WeakTask().predict(Fixed(logits), batch)
    # By hand, class by class: the largest segment score, then a softmax over classes.
    pooled = np.array([[max(logits[b, t, c].item() for t in range(4)) for c in range(5)] for b in range(3)])
    expected = np.exp(pooled) / np.exp(pooled).sum(1, keepdims=True)
    np.testing.assert_allclose(out["video_scores"], expected, rtol=1e-6)
    # Segment predictions stay per segment (for the segment-accuracy evaluation).
    np.testing.assert_allclose(out["scores"], logits.softmax(-1).numpy(), rtol=1e-6)
    assert out["scores"].shape == (3, 4, 5)
    np.testing.assert_array_equal(out["video_label"], batch["video_label"].numpy())


def test_weak_loss_is_mlsm_between_video_softmax_and_video_label():
    logits, batch = _batch()
    task = WeakTask()
    assert task.loss == "softmax_mlsm"
    per_video = task.losses(Fixed(logits), batch)
    video_probs = logits.max(dim=1).values.softmax(-1)
    reference = torch.nn.MultiLabelSoftMarginLoss()(video_probs, batch["video_label"])
    torch.testing.assert_close(per_video.mean(), reference)
    # The segment targets play no part in the weak loss.
    batch2 = {**batch, "target": torch.zeros_like(batch["target"])}
    torch.testing.assert_close(task.losses(Fixed(logits), batch2), per_video)
    # Only the max segment of each class gets a gradient (MIL max pooling).
    model = Fixed(logits)
    task.losses(model, batch).sum().backward()
    nonzero = (model.logits.grad != 0).sum(dim=1)
    assert (nonzero <= 1).all()


def test_original_weak_model_video_probs(fixtures_dir):
    """The official weak model (max over time, then softmax) reproduced through the weak task."""
    from avel.compat.original import read_original

    io = np.load(fixtures_dir / "original" / "io.npz")
    state = read_original(fixtures_dir / "original" / "AV_att_weak_whole_legacy.pt").state_dict
    rename = {"affine": "attention.", "L1": "head.", "L2": "head."}
    model = build_model("av_att")
    model.load_state_dict({next((p + k for s, p in rename.items() if k.startswith(s)), k): v for k, v in state.items()})
    model.eval()
    audio, visual = torch.from_numpy(io["audio"]), torch.from_numpy(io["visual"])
    B = audio.shape[0]
    batch = {"audio": audio, "visual": visual, "target": torch.zeros(B, 10, 29), "video_label": torch.zeros(B, 29),
             "index": torch.arange(B)}
    with torch.no_grad():
        out = WeakTask().predict(model, batch)
        seg = model(audio, visual)["logits"].numpy()
    np.testing.assert_allclose(out["video_scores"], io["AV_att_weak_video_probs"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(seg, io["AV_att_weak_segment_scores"], rtol=0, atol=1e-5)


# --- background videos ----------------------------------------------------------------------------------

class Ids:
    """A row source that returns its own row ids (tagged by source)."""

    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def read(self, idx):
        idx = np.asarray(idx)
        return {"id": idx + self.tag * 1_000_000}


def test_every_background_row_is_seen_each_epoch_real_sizes(ave_dir):
    """AVE sizes: train rows + the 178 background videos, batch 64. The original appended the
    background rows and ran len // 64 batches, so the last partial batch (61 rows, all background)
    was never seen; here every row is seen once per epoch, shuffled or not."""
    with h5py.File(ave_dir / "train_order.h5", "r") as f:
        n_train = len(f["order"])
    with h5py.File(ave_dir / "labels_noisy.h5", "r") as f:
        n_bg = len(f["avadataset"])
    src = ConcatRows([Ids(n_train, 0), Ids(n_bg, 1)])
    assert len(src) == n_train + n_bg
    everything = sorted([*range(n_train), *range(1_000_000, 1_000_000 + n_bg)])
    for shuffle in (False, True):
        loader = Batches(src, 64, shuffle=shuffle, seed=0, prefetch=0)
        for epoch in range(2):
            loader.set_epoch(epoch)
            seen = np.concatenate([b["id"].numpy() for b, _ in loader])
            assert sorted(seen.tolist()) == everything
    # The original scheme (no shuffle, whole batches only) misses the tail of the background rows.
    original = Batches(src, 64, shuffle=False, drop_last=True, prefetch=0)
    seen = set(np.concatenate([b["id"].numpy() for b, _ in original]).tolist())
    missed = [i for i in everything if i not in seen]
    assert len(missed) == (n_train + n_bg) % 64 and all(i >= 1_000_000 for i in missed)
    # Shuffled, the two epochs differ and background rows are spread over the epoch.
    loader = Batches(src, 64, shuffle=True, seed=0, prefetch=0)
    first = [b["id"].numpy() for b, _ in loader]
    assert sum((ids >= 1_000_000).any() for ids in first) > len(first) // 2


def _row_keys(audio: np.ndarray) -> list[bytes]:
    return [a.tobytes() for a in audio]


def test_weak_train_source_mixes_official_background(root):
    data = AVEData.open(root)
    cfg = quick_config(root, task="weak", shuffle=True)
    src = WeakTask().train_source(data, cfg)
    n_train = len(data.split("train"))
    assert isinstance(src, ConcatRows) and len(src) == n_train + 12
    with h5py.File(root / "audio_feature_noisy.h5", "r") as f:
        bg_keys = set(_row_keys(f["avadataset"][()].astype(np.float32)))
    C = data.num_classes
    loader = Batches(src, 16, shuffle=True, seed=3)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = [b for b, _ in loader]
        audio = np.concatenate([b["audio"].numpy() for b in batches])
        video = np.concatenate([b["video_label"].numpy() for b in batches])
        target = np.concatenate([b["target"].numpy() for b in batches])
        keys = _row_keys(audio)
        is_bg = np.array([k in bg_keys for k in keys])
        assert is_bg.sum() == 12 and len(set(k for k in keys if k in bg_keys)) == 12
        # Background rows: video label 'background', every segment background.
        assert (video[is_bg].argmax(1) == C - 1).all() and (target[is_bg].argmax(-1) == C - 1).all()
        assert (video[~is_bg].argmax(1) != C - 1).all()
    no_bg = WeakTask().train_source(data, replace(cfg, data=replace(cfg.data, official_background=False)))
    assert isinstance(no_bg, SegmentRows) and len(no_bg) == n_train


def _background_folder(path, source_root, **overrides):
    """A folder of background-only videos in the feature-store layout (audio/visual_feature.h5)."""
    other = synth(path.parent / (path.name + "_src"), videos=20, background_videos=0, seed=5, **overrides)
    path.mkdir()
    for name in ("audio_feature.h5", "visual_feature.h5", "features.json"):
        shutil.copy(other / name, path / name)
    return path


def test_user_background_folders(root, tmp_path):
    extra = _background_folder(tmp_path / "bg", root)
    data = AVEData.open(root)
    cfg = quick_config(root, task="weak")
    cfg = replace(cfg, data=replace(cfg.data, background=(str(extra),), official_background=False))
    src = WeakTask().train_source(data, cfg)
    n_train = len(data.split("train"))
    assert len(src) == n_train + 20
    rows = src.read(np.arange(n_train, n_train + 20))
    with h5py.File(extra / "audio_feature.h5", "r") as f:
        np.testing.assert_array_equal(rows["audio"], f["avadataset"][()])
    assert (rows["video_label"].argmax(1) == data.num_classes - 1).all()
    both = WeakTask().train_source(data, replace(cfg, data=replace(cfg.data, official_background=True)))
    assert len(both) == n_train + 12 + 20


def test_cli_background_options(root, tmp_path, cli_train_config):
    c = cli_train_config(["--data-root", str(root), "--out", str(tmp_path / "r"), "--task", "weak",
                          "--background", str(tmp_path / "a"), "--background", str(tmp_path / "b"),
                          "--no-official-background", "--selection", "segment"])
    # No --recipe: the recommended one, for the weak task.
    assert c.task == "weak" and c.recipe == "modern" and c.epochs == recipe("modern", "weak").epochs
    assert c.data.background == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert c.data.official_background is False and c.selection == "segment"


def test_background_of_another_spec_is_refused(root, tmp_path):
    data = AVEData.open(root)
    cfg = quick_config(root, task="weak")
    # Another visual dimension: the spec says so.
    wrong = _background_folder(tmp_path / "wrong", root, visual_dim=24)
    with pytest.raises(DataError) as e:
        WeakTask().train_source(data, replace(cfg, data=replace(cfg.data, background=(str(wrong),))))
    assert str(wrong) in str(e.value) and "visual dim" in str(e.value)
    # Another backbone recorded for the same shapes.
    relabeled = _background_folder(tmp_path / "relabeled", root)
    meta = json.loads((relabeled / "features.json").read_text())
    meta["spec"]["visual"]["backbone"] = "vgg19-pool5"
    (relabeled / "features.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="visual backbone"):
        WeakTask().train_source(data, replace(cfg, data=replace(cfg.data, background=(str(relabeled),))))
    # Same recorded spec but another grid on disk: refused too, naming the file.
    grid = _background_folder(tmp_path / "grid", root, grid=(2, 2))
    shutil.copy(root / "features.json", grid / "features.json")
    with pytest.raises(DataError) as e:
        WeakTask().train_source(data, replace(cfg, data=replace(cfg.data, background=(str(grid),))))
    assert "visual_feature.h5" in str(e.value)


# --- selection ------------------------------------------------------------------------------------------

def test_selection_default_and_segment_recorded(root, tmp_path):
    common = ["train", "--data-root", str(root), "--task", "weak", "--model", "av", "--epochs", "1",
              "--batch-size", "32", "--no-progress", "--set", "model_kwargs.hidden=8",
              "--set", "model_kwargs.head_hidden=8", "--set", "threads=1"]
    assert main(common + ["--out", str(tmp_path / "default")]) == 0
    card = read_card(tmp_path / "default")
    cfg = card.training
    assert card.task == "weak" and cfg["selection"] == "video_accuracy"
    assert "video_accuracy" in cfg["val_metrics"] and cfg["selection_score"] == cfg["val_metrics"]["video_accuracy"]
    assert main(common + ["--out", str(tmp_path / "segment"), "--selection", "segment"]) == 0
    cfg = read_card(tmp_path / "segment").training
    assert cfg["selection"] == "accuracy" and cfg["selection_score"] == cfg["val_metrics"]["accuracy"]
    with pytest.raises(ValueError):
        build_task(apply_overrides(quick_config(root, task="weak"), ["selection=best"]))


# --- a short weak run ----------------------------------------------------------------------------------

def test_short_weak_run_beats_majority_class(tmp_path):
    root = synth(tmp_path / "ave", videos=200, background_videos=200, classes=4, seed=1, splits=(0.6, 0.2, 0.2))
    cfg = quick_config(root, task="weak", recipe_name="modern", epochs=24, eval_every=4,
                       model_kwargs={"hidden": 32, "att_hidden": 32, "head_hidden": 32})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.selection_key == "video_accuracy"
    data = AVEData.open(root)
    task = build_task(cfg)
    test, out = evaluate(load(tmp_path / "run").model, task, task.eval_source(data, "test"), data.class_names)
    truth = data.targets[data.split("test")].argmax(-1)
    majority = np.bincount(truth.ravel()).max() / truth.size
    print(f"weak run: test segment accuracy {test['accuracy']:.3f}, majority-class rate {majority:.3f}, "
          f"test video accuracy {test['video_accuracy']:.3f} (best epoch {result.best_epoch})")
    assert test["accuracy"] >= majority + 0.1
    assert test["video_accuracy"] >= 0.6                     # 4 classes: chance is 0.25
