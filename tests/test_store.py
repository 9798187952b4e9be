"""Feature store: lazy h5 rows, packed layout, shape/key/file errors, and the integrity report."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from avel.cli import main
from avel.data.checks import check_folder
from avel.data.datasets import AVEData
from avel.data.errors import DataError
from avel.data.store import H5Rows, NpyRows, open_store, pack, read_spec

from _coredata import synth, write_h5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("store") / "ave", videos=40, background_videos=0)


@pytest.fixture
def work(folder, tmp_path):
    """A private copy of the synthetic folder that a test may damage."""
    return shutil.copytree(folder, tmp_path / "ave")


# --- lazy row reads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_any_order_with_repeats(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(23, 4, 5)).astype(dtype)
    write_h5(tmp_path / "x.h5", data)
    rows = H5Rows(tmp_path / "x.h5")
    assert len(rows) == 23 and rows.shape == (23, 4, 5) and rows.dtype == dtype
    for idx in ([5, 1, 5, 22, 0, 1], [22, 21, 20], [7], list(range(23))[::-1], [3, 4, 5, 9, 10, 3]):
        got = rows.read(idx)
        assert got.dtype == np.float32
        assert got.shape == (len(idx), 4, 5)
        np.testing.assert_array_equal(got, data[idx].astype(np.float32))
    assert rows.read(np.array([], dtype=np.int64)).shape == (0, 4, 5)
    np.testing.assert_array_equal(rows.read(np.array([[2, 1], [0, 2]])), data[[2, 1, 0, 2]].astype(np.float32))


def test_rows_out_of_range_names_the_file(tmp_path):
    write_h5(tmp_path / "x.h5", np.zeros((5, 2, 3), np.float32))
    rows = H5Rows(tmp_path / "x.h5")
    for bad in ([0, 5], [-1], [2, 100]):
        with pytest.raises(DataError, match="out of range") as e:
            rows.read(bad)
        assert str(tmp_path / "x.h5") in str(e.value)


def test_read_touches_only_requested_rows(tmp_path):
    """A dataset of 200 GB (float64, like the release's visual file but bigger), chunked per row and
    sparse on disk: reading a few rows is instant; loading it whole could not happen."""
    path = tmp_path / "huge.h5"
    shape = (100_000, 10, 7, 7, 512)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("avadataset", shape=shape, dtype=np.float64, chunks=(1, 10, 7, 7, 512),
                              fillvalue=0.0)
        ds[77_777] = 1.5
        ds[3] = -2.0
    assert path.stat().st_size < 20_000_000
    rows = H5Rows(path)
    assert rows.shape == shape
    got = rows.read([77_777, 5, 3, 77_777])
    assert got.shape == (4, 10, 7, 7, 512) and got.dtype == np.float32
    assert (got[0] == 1.5).all() and (got[3] == 1.5).all()
    assert (got[1] == 0).all() and (got[2] == -2.0).all()


def test_read_reads_sorted_runs_not_the_file(tmp_path, monkeypatch):
    """The dataset is only ever sliced over the requested rows (contiguous runs, increasing)."""
    data = np.arange(30 * 2, dtype=np.float64).reshape(30, 2)
    write_h5(tmp_path / "x.h5", data)
    rows = H5Rows(tmp_path / "x.h5")
    ds = rows._dataset()
    seen = []

    class Spy:
        shape, dtype = ds.shape, ds.dtype

        def __getitem__(self, key):
            seen.append(key)
            return ds[key]

    monkeypatch.setattr(rows, "_dataset", lambda: Spy())
    got = rows.read([12, 3, 4, 13, 5, 27])
    np.testing.assert_array_equal(got, data[[12, 3, 4, 13, 5, 27]])
    touched = sorted({i for k in seen for i in range(30)[k]})
    assert touched == [3, 4, 5, 12, 13, 27]
    assert len(seen) == 3                       # three runs: 3..5, 12..13, 27


def test_h5rows_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        H5Rows(tmp_path / "missing.h5")
    assert "missing.h5" in str(e.value)
    write_h5(tmp_path / "k.h5", np.zeros((2, 2)), key="features")
    with pytest.raises(DataError) as e:
        H5Rows(tmp_path / "k.h5")
    assert "k.h5" in str(e.value) and "avadataset" in str(e.value) and "features" in str(e.value)
    (tmp_path / "junk.h5").write_bytes(b"this is not hdf5")
    with pytest.raises(DataError, match="HDF5") as e:
        H5Rows(tmp_path / "junk.h5")
    assert "junk.h5" in str(e.value)


# --- folder-level errors --------------------------------------------------------------------------

def test_open_synthetic_folder(folder):
    data = AVEData.open(folder)
    assert data.store.layout == "h5"
    assert len(data.store) == len(data.annotations) == 40
    assert data.store.visual.shape[1:] == (10, 3, 3, 16)
    assert data.targets.shape == (40, 10, 4)
    assert data.video_labels.shape == (40, 4)
    assert data.event_mask.shape == (40, 10)
    # labels.h5 agrees with the spans in Annotations.txt (same [Start, End) convention).
    np.testing.assert_array_equal(data.targets, data.annotations.segment_labels(10))
    splits = [data.split(s) for s in ("train", "val", "test")]
    assert sorted(np.concatenate(splits).tolist()) == list(range(40))


def test_missing_feature_file(work):
    (work / "visual_feature.h5").unlink()
    with pytest.raises(DataError, match="not found") as e:
        AVEData.open(work)
    assert "visual_feature.h5" in str(e.value)


def test_wrong_key_in_feature_file(work):
    with h5py.File(work / "audio_feature.h5", "a") as f:
        f.move("avadataset", "features")
    with pytest.raises(DataError) as e:
        AVEData.open(work)
    assert "audio_feature.h5" in str(e.value) and "avadataset" in str(e.value)


def test_audio_visual_row_mismatch(work):
    with h5py.File(work / "audio_feature.h5", "r") as f:
        audio = f["avadataset"][:30]
    write_h5(work / "audio_feature.h5", audio)
    with pytest.raises(DataError) as e:
        AVEData.open(work)
    assert "audio_feature.h5" in str(e.value) and "visual_feature.h5" in str(e.value)


def test_audio_visual_segment_mismatch(work):
    with h5py.File(work / "audio_feature.h5", "r") as f:
        audio = f["avadataset"][:, :8]
    write_h5(work / "audio_feature.h5", audio)
    with pytest.raises(DataError, match="segments") as e:
        AVEData.open(work)
    assert "audio_feature.h5" in str(e.value) and "visual_feature.h5" in str(e.value)


def test_feature_rank_errors_name_the_file(work):
    write_h5(work / "audio_feature.h5", np.zeros(40, np.float32))
    with pytest.raises(DataError) as e:
        AVEData.open(work)
    assert "audio_feature.h5" in str(e.value) and "[N, T, D]" in str(e.value)


def test_annotations_row_mismatch(work):
    lines = (work / "Annotations.txt").read_text().splitlines()
    (work / "Annotations.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError) as e:
        AVEData.open(work)
    assert "Annotations.txt" in str(e.value) and "audio_feature.h5" in str(e.value)


@pytest.mark.parametrize("name,attr,shape", [("labels.h5", "targets", (40, 10, 5)),
                                             ("mil_labels.h5", "video_labels", (40, 3)),
                                             ("labels_closs.h5", "event_mask", (39, 10))])
def test_label_file_shape_mismatch(work, name, attr, shape):
    write_h5(work / name, np.zeros(shape, np.float32))
    data = AVEData.open(work)
    with pytest.raises(DataError) as e:
        getattr(data, attr)
    assert name in str(e.value) and str(shape) in str(e.value)


def test_visual_vectors_shape_mismatch(work):
    write_h5(work / "visual_feature_vec.h5", np.zeros((40, 10, 7), np.float32))
    with pytest.raises(DataError) as e:
        AVEData.open(work).visual_vectors()
    assert "visual_feature_vec.h5" in str(e.value)


def test_order_index_out_of_range(work):
    write_h5(work / "val_order.h5", np.array([0, 3, 40]), key="order")
    data = AVEData.open(work)
    with pytest.raises(DataError, match="out of range") as e:
        data.split("val")
    assert "val_order.h5" in str(e.value) and "40" in str(e.value)
    write_h5(work / "val_order.h5", np.array([-1]), key="order")
    with pytest.raises(DataError, match="out of range"):
        data.split("val")
    (work / "test_order.h5").unlink()
    (work / "test_order_match.h5").unlink()
    with pytest.raises(DataError, match="test_order.h5"):
        data.split("test")
    with pytest.raises(ValueError):
        data.split("dev")


def test_match_orders_fall_back_to_plain_orders(work):
    data = AVEData.open(work)
    plain = data.split("val")
    write_h5(work / "val_order_match.h5", plain[:2], key="order")
    np.testing.assert_array_equal(data.split("val", match=True), plain[:2])
    (work / "val_order_match.h5").unlink()
    np.testing.assert_array_equal(data.split("val", match=True), plain)


# --- packed layout ----------------------------------------------------------------------------------

def test_pack_same_rows_float16(work):
    h5 = open_store(work, layout="h5")
    out = pack(work)
    meta = json.loads((out / "packed.json").read_text())
    assert meta["dtype"] == "float16" and meta["rows"] == 40
    assert meta["source"] == {"audio": "audio_feature.h5", "visual": "visual_feature.h5"}
    assert meta["spec"] == read_spec(work).to_dict()
    packed = open_store(work)                              # auto prefers packed
    assert packed.layout == "packed"
    assert isinstance(packed.audio, NpyRows) and packed.audio.dtype == np.float16
    assert packed.spec == h5.spec
    idx = [39, 0, 17, 17, 5]
    for name in ("audio", "visual"):
        a, b = getattr(h5, name).read(idx), getattr(packed, name).read(idx)
        assert a.shape == b.shape and b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
        assert not np.array_equal(a, b)                    # it really is the float16 copy
    assert open_store(work, layout="h5").layout == "h5"
    with pytest.raises(DataError, match="out of range") as e:
        packed.audio.read([40])
    assert "audio.npy" in str(e.value)
    # A training folder opens packed too, with the same rows.
    data = AVEData.open(work)
    assert data.store.layout == "packed"


def test_pack_float32_exact_and_packed_required(work):
    with pytest.raises(DataError, match="pack"):
        open_store(work, layout="packed")
    pack(work, dtype="float32", rows_per_chunk=7)
    h5, packed = open_store(work, layout="h5"), open_store(work, layout="packed")
    np.testing.assert_array_equal(h5.visual.read(np.arange(40)), packed.visual.read(np.arange(40)))
    assert not list((work / "packed").glob("*.partial"))


def test_pack_refuses_float16_overflow(work):
    with h5py.File(work / "audio_feature.h5", "a") as f:
        f["avadataset"][3, 0, 0] = 1e6
    with pytest.raises(DataError, match="float16") as e:
        pack(work)
    assert "audio_feature.h5" in str(e.value)
    assert not (work / "packed" / "packed.json").exists()
    assert open_store(work).layout == "h5"


def test_bad_layout_name(work):
    with pytest.raises(ValueError):
        open_store(work, layout="zarr")


# --- integrity report --------------------------------------------------------------------------------

def test_data_check_on_real_release(ave_dir, capsys):
    rc = main(["data", "check", str(ave_dir), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] and report["problems"] == []
    assert report["facts"]["rows"] == 4143
    assert report["facts"]["unique_video_ids"] == 4097
    assert report["facts"]["categories"] == 28
    notes = report["notes"]
    assert any("Start = End = 0" in n and "all background" in n and "line" in n for n in notes), notes
    assert any("more than one row" in n for n in notes), notes
    # Ids in both train and test: count them independently and find that count in the report.
    from avel.data.annotations import parse_annotations

    ann = parse_annotations(ave_dir / "Annotations.txt")
    ids = {}
    for split in ("train", "test"):
        with h5py.File(ave_dir / f"{split}_order.h5", "r") as f:
            ids[split] = {ann.rows[i].video_id for i in f["order"][()].reshape(-1)}
    shared = ids["train"] & ids["test"]
    assert shared
    leak = [n for n in notes if "both train and test" in n]
    assert len(leak) == 1 and leak[0].startswith(f"{len(shared)} video ids"), notes
    assert any(s in leak[0] for s in shared)
    assert any("audio_feature.h5" in n and "not here" in n for n in notes)


def test_data_check_reports_nan(work, capsys):
    assert check_folder(work).problems == []
    with h5py.File(work / "visual_feature.h5", "a") as f:
        f["avadataset"][11, 2, 1, 1, 3] = np.nan
        f["avadataset"][30, 0, 0, 0, 0] = np.inf
    report = check_folder(work)
    assert any("visual_feature.h5" in p and "2 NaN/Inf" in p for p in report.problems), report.problems
    assert report.files["visual_feature.h5"]["nonfinite"] == 2
    assert main(["data", "check", str(work)]) == 1
    assert "NaN/Inf" in capsys.readouterr().out
    # Without the value scan the report does not look at values.
    assert check_folder(work, scan_values=False).problems == []


def test_data_check_reports_bad_orders_and_shapes(work):
    write_h5(work / "test_order.h5", np.array([0, 1, 99]), key="order")
    write_h5(work / "labels_closs.h5", np.zeros((41, 10), np.float32))
    problems = check_folder(work).problems
    assert any("test_order.h5" in p and "out of range" in p for p in problems), problems
    assert any("labels_closs.h5" in p and "41 rows" in p for p in problems), problems
