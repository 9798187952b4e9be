"""Cross-modal matching (CML): contrastive loss, pair rows, whole-video vectors, grid-averaged
visual vectors, vectorised evaluation, and a short run against the chance rate of the search."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avel import load, metrics
from avel.cli import main
from avel.data.datasets import AVEData, Batches, GridMeanRows, PairRows
from avel.data.store import H5Rows
from avel.engine.evaluate import collect
from avel.engine.train import train
from avel.models import build_model
from avel.models.cml import KERAS_EPSILON, pairwise_distance
from avel.tasks import CrossModalTask, VideoVectors, build_task

from _coredata import quick_config, synth

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("cml") / "ave", videos=40, background_videos=0)


class GivenDistance(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d = torch.nn.Parameter(torch.as_tensor(d, dtype=torch.float32))

    def forward(self, audio, visual):
        return {"distance": self.d}


def test_contrastive_loss_by_hand():
    d = [0.5, 1.5, 2.5, 0.5, 0.0]
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    loss = CrossModalTask(margin=2.0).losses(GivenDistance(d), {"audio": None, "visual": None, "target": y})
    # matched: d^2; unmatched: max(margin - d, 0)^2
    torch.testing.assert_close(loss, torch.tensor([0.25, 0.25, 0.0, 2.25, 0.0]))
    loss = CrossModalTask(margin=1.0).losses(GivenDistance(d), {"audio": None, "visual": None, "target": y})
    torch.testing.assert_close(loss, torch.tensor([0.25, 0.0, 0.0, 0.25, 0.0]))
    assert build_task(quick_config(".", task="cml", margin=3.0)).margin == 3.0


def test_cml_model_distance_and_contract():
    torch.manual_seed(0)
    model = build_model("cml", audio_dim=6, visual_dim=10)
    a, v = torch.rand(7, 6), torch.rand(7, 10)
    d = model(a, v)["distance"]
    assert d.shape == (7,)
    e_a, e_v = model.embed(a, v)
    assert e_a.shape == e_v.shape == (7, 64)
    torch.testing.assert_close(d, ((e_v - e_a) ** 2).sum(-1).clamp_min(KERAS_EPSILON).sqrt())
    # pairwise_distance: [.., N, E] x [.., M, E] -> [.., N, M]; its diagonal is the row-wise distance.
    full = pairwise_distance(e_v, e_a)
    assert full.shape == (7, 7)
    torch.testing.assert_close(torch.diagonal(full), d)
    # Identical embeddings: the Keras floor, not 0 (and a finite gradient).
    x = torch.zeros(2, 3, requires_grad=True)
    pd = pairwise_distance(x, x)
    assert torch.allclose(pd, torch.full((2, 2), KERAS_EPSILON ** 0.5))
    pd.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(TypeError):
        build_model("cml", grid=(7, 7))


# --- row sources ----------------------------------------------------------------------------------

def test_pair_rows_labelled_from_event_mask(root):
    data = AVEData.open(root)
    task = CrossModalTask()
    cfg = quick_config(root, task="cml")
    pairs = task.train_source(data, cfg)
    rows = data.split("train", match=True)
    T = data.segments
    assert isinstance(pairs, PairRows) and len(pairs) == len(rows) * T
    items = np.array([0, T - 1, T, 3 * T + 4, len(pairs) - 1, 3 * T + 4])
    got = pairs.read(items)
    r, t = rows[items // T], items % T
    audio = H5Rows(root / "audio_feature.h5").read(r)[np.arange(len(items)), t]
    vec = H5Rows(root / "visual_feature_vec.h5").read(r)[np.arange(len(items)), t]
    np.testing.assert_array_equal(got["audio"], audio)
    np.testing.assert_array_equal(got["visual"], vec)
    np.testing.assert_array_equal(got["target"], data.event_mask[r, t])
    # The label is 1 exactly inside [Start, End) of the annotation.
    ann = data.annotations.rows
    expected = [1.0 if ann[i].start <= s < ann[i].end else 0.0 for i, s in zip(r, t)]
    np.testing.assert_array_equal(got["target"], expected)
    # A full epoch has both kinds of pair.
    every = pairs.read(np.arange(len(pairs)))["target"]
    assert 0 < every.mean() < 1
    assert every.sum() == data.event_mask[rows].sum()


def test_video_vectors(root):
    data = AVEData.open(root)
    src = CrossModalTask().eval_source(data, "val")
    rows = data.split("val", match=True)
    assert isinstance(src, VideoVectors) and len(src) == len(rows)
    got = src.read([2, 0])
    np.testing.assert_array_equal(got["index"], rows[[2, 0]])
    assert got["audio"].shape == (2, 10, 16) and got["visual"].shape == (2, 10, 16)
    np.testing.assert_array_equal(got["event_mask"], data.event_mask[rows[[2, 0]]])
    np.testing.assert_array_equal(got["audio"], data.store.audio.read(rows[[2, 0]]))


def test_grid_mean_vectors_equal_the_vector_file(root, tmp_path):
    data = AVEData.open(root)
    from_file = data.visual_vectors()
    assert from_file is not None
    computed = GridMeanRows(data.store.visual)
    idx = np.array([5, 1, 39, 5])
    np.testing.assert_allclose(computed.read(idx), from_file.read(idx), rtol=1e-6, atol=1e-6)
    assert computed.read(idx).shape == (4, 10, 16)
    # Without the file the task averages the grid itself, and predicts the same.
    bare = shutil.copytree(root, tmp_path / "bare")
    (bare / "visual_feature_vec.h5").unlink()
    task = CrossModalTask()
    bare_data = AVEData.open(bare)
    assert bare_data.visual_vectors() is None
    assert isinstance(task._vectors(bare_data), GridMeanRows)
    assert isinstance(task._vectors(data), H5Rows)
    torch.manual_seed(0)
    model = build_model("cml", audio_dim=16, visual_dim=16)
    with_file = collect(model, task, task.eval_source(data, "test"))
    without = collect(model, task, task.eval_source(bare_data, "test"))
    np.testing.assert_allclose(without["dists"], with_file["dists"], rtol=1e-5, atol=1e-6)
    pairs_a = task.train_source(data, quick_config(root, task="cml")).read(np.arange(30))
    pairs_b = task.train_source(bare_data, quick_config(bare, task="cml")).read(np.arange(30))
    np.testing.assert_allclose(pairs_b["visual"], pairs_a["visual"], rtol=1e-6, atol=1e-6)


def test_evaluation_is_vectorised_over_the_split(root):
    data = AVEData.open(root)
    task = CrossModalTask()
    src = task.eval_source(data, "train")
    torch.manual_seed(0)
    model = build_model("cml", audio_dim=16, visual_dim=16)
    calls = []
    real_embed = model.embed

    def spy(audio, visual):
        calls.append((tuple(audio.shape), tuple(visual.shape)))
        return real_embed(audio, visual)

    model.embed = spy
    out = collect(model, task, src, batch_size=len(src))
    N = len(src)
    assert calls == [((N, 10, 16), (N, 10, 16))]               # one pass for the whole split
    assert out["dists"].shape == (N, 10, 10)
    assert out["event_mask"].shape == (N, 10)
    # Entry [n, i, j] is d(visual second i, audio second j) of video n.
    batch = src.read([3])
    with torch.no_grad():
        e_a, e_v = real_embed(torch.from_numpy(batch["audio"][0]), torch.from_numpy(batch["visual"][0]))
        for i in (0, 4):
            for j in (0, 7):
                d = (e_v[i] - e_a[j]).pow(2).sum().clamp_min(KERAS_EPSILON).sqrt()
                assert out["dists"][3, i, j] == pytest.approx(float(d), rel=1e-5)
    # Batched the same way in smaller batches: identical values.
    calls.clear()
    small = collect(model, task, src, batch_size=7)
    assert len(calls) == len(Batches(src, 7))
    np.testing.assert_allclose(small["dists"], out["dists"], rtol=1e-6)
    scored = task.score(out, data.class_names)
    assert scored["mean_accuracy"] == pytest.approx((scored["a2v_accuracy"] + scored["v2a_accuracy"]) / 2)
    assert scored == {**metrics.cross_modal_localization(out["dists"], out["event_mask"]),
                      "mean_accuracy": scored["mean_accuracy"]}


# --- a short run ----------------------------------------------------------------------------------

def test_short_cml_run_beats_chance(tmp_path, capsys):
    root = synth(tmp_path / "ave", videos=120, background_videos=0, seed=1, splits=(0.6, 0.2, 0.2))
    cfg = quick_config(root, task="cml", epochs=5)
    assert (cfg.batch_size, cfg.margin, cfg.model) == (8, 2.0, "cml")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.selection_key == "mean_accuracy"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["task"] == "cml" and saved["model"] == "cml"
    assert main(["evaluate", "--data-root", str(root), "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    test = json.loads(capsys.readouterr().out)
    assert test["task"] == "cml" and test["evaluated_videos"] > 10
    chance = test["chance_accuracy"]
    print(f"cml run: test A2V {test['a2v_accuracy']:.1f}%, V2A {test['v2a_accuracy']:.1f}%, "
          f"chance {chance:.1f}% ({test['evaluated_videos']} videos); "
          f"val mean {result.best_score:.1f}% (epoch {result.best_epoch})")     # shown with -s
    assert 5 < chance < 50
    assert test["a2v_accuracy"] >= chance + 20
    assert test["v2a_accuracy"] >= chance + 20
    assert result.best_metrics["mean_accuracy"] >= result.best_metrics["chance_accuracy"] + 20
    model, card = load(tmp_path / "run")
    assert card.training["selection"] == "mean_accuracy"
