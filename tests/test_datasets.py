"""AVE folders as the trainer sees them: the fixed AVE class order, subsets of the release."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from avel.data.annotations import ave_categories, parse_annotations
from avel.data.datasets import AVEData
from avel.engine.train import train

from _coredata import quick_config, write_h5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def subset(tmp_path_factory, ave_dir):
    """1,000 rows of the release that lack the first category, with the official label file cut to them."""
    full = parse_annotations(ave_dir / "Annotations.txt")
    lines = [ln for ln in (ave_dir / "Annotations.txt").read_text().splitlines() if ln.strip()]
    rows = [a.row for a in full.rows if a.category != full.categories[0]][:1000]
    root = tmp_path_factory.mktemp("subset") / "ave"
    root.mkdir()
    (root / "Annotations.txt").write_text("".join(lines[r] + "\n" for r in rows))
    with h5py.File(ave_dir / "mil_labels.h5", "r") as f:
        mil = f["avadataset"][()]
    write_h5(root / "mil_labels.h5", mil[rows])
    rng = np.random.default_rng(0)
    write_h5(root / "audio_feature.h5", rng.random((1000, 10, 8), dtype=np.float32))
    write_h5(root / "visual_feature.h5", rng.random((1000, 10, 2, 2, 4), dtype=np.float32))
    order = rng.permutation(1000)
    for name, part in (("train", order[:800]), ("val", order[800:900]), ("test", order[900:])):
        write_h5(root / f"{name}_order.h5", np.sort(part), key="order")
    return root, full, rows, mil


def test_a_subset_keeps_the_official_class_indices(subset):
    root, full, rows, mil = subset
    data = AVEData.open(root)
    assert data.class_names == full.class_names                   # 28 AVE classes + background, same order
    assert data.num_classes == 29 and full.categories[0] not in {a.category for a in data.annotations.rows}
    np.testing.assert_array_equal(data.annotations.class_indices(), full.class_indices()[rows])
    np.testing.assert_array_equal(data.video_labels, mil[rows])   # the official 29-column file is accepted
    assert list(ave_categories()) == list(full.categories)


def test_a_subset_trains(subset, tmp_path):
    root, full, *_ = subset
    result = train(quick_config(root, epochs=1), tmp_path / "run", progress=False)
    assert result.best_epoch == 1


def test_categories_txt_fixes_the_order(tmp_path, ave_dir):
    root = tmp_path / "ave"
    root.mkdir()
    (root / "Annotations.txt").write_text("b&vid1&good&0&5\na&vid2&good&1&4\n")
    write_h5(root / "audio_feature.h5", np.zeros((2, 10, 4), np.float32))
    write_h5(root / "visual_feature.h5", np.zeros((2, 10, 1, 1, 4), np.float32))
    assert AVEData.open(root).class_names == ["b", "a", "background"]            # first appearance
    (root / "categories.txt").write_text("a\nb\nc\n")
    assert AVEData.open(root).class_names == ["a", "b", "c", "background"]
    shutil.copy(ave_dir / "categories.txt", root / "categories.txt")
    from avel.data.errors import DataError

    with pytest.raises(DataError, match="categories not in the class list"):
        AVEData.open(root)


BROKEN_DATA = ["2d_audio", "spec_not_json", "group", "complex", "string", "scalar", "float_order", "huge"]


def break_data_folder(root, breakage: str):
    """Break the synthetic AVE folder ``root`` (12 videos) in place as ``breakage`` says (one of BROKEN_DATA)."""
    if breakage == "2d_audio":
        write_h5(root / "audio_feature.h5", np.zeros((12, 160), np.float32))
    elif breakage == "spec_not_json":
        (root / "features.json").write_text("{not json")
    elif breakage == "group":
        (root / "audio_feature.h5").unlink()
        with h5py.File(root / "audio_feature.h5", "w") as f:
            f.create_group("avadataset")
    elif breakage == "complex":
        write_h5(root / "audio_feature.h5", np.zeros((12, 10, 16), np.complex64))
    elif breakage == "string":
        write_h5(root / "audio_feature.h5", np.array([b"x"] * 12))
    elif breakage == "scalar":
        write_h5(root / "audio_feature.h5", np.float32(3))
    elif breakage == "float_order":
        write_h5(root / "train_order.h5", np.array([0.5, 1.0, 2.0]), key="order")
    elif breakage == "huge":
        (root / "visual_feature.h5").unlink()
        with h5py.File(root / "visual_feature.h5", "w") as f:      # ~10 KB on disk, 73 GiB declared
            f.create_dataset("avadataset", shape=(12, 10, 7, 7, 4_000_000), dtype=np.float32, chunks=(1, 1, 1, 1, 1000))
    return root


@pytest.mark.parametrize("breakage", BROKEN_DATA)
def test_data_check_refuses_what_training_refuses(tmp_path, breakage):
    """`avel data check` and training agree: a folder one refuses, the other refuses too."""
    from avel.data.checks import check_folder
    from avel.data.errors import DataError

    from _coredata import synth

    root = synth(tmp_path / "ave", videos=12, background_videos=0)
    break_data_folder(root, breakage)
    with pytest.raises(DataError) as err:
        AVEData.open(root).split("train")
    assert str(root) in str(err.value)
    assert check_folder(root, scan_values=False).problems
