"""avel.compat: official AVE checkpoints read without running pickled code; official Keras CML weights."""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch

from avel.compat import (
    KerasWeightsError,
    OriginalCheckpointError,
    UnsafeCheckpointError,
    load_keras_cml,
    load_original,
    read_original,
)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def orig(fixtures_dir):
    return fixtures_dir / "original"


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def io_npz(orig):
    return _npz(orig / "io.npz")


def _run(model, io_npz):
    with torch.no_grad():
        return model(torch.from_numpy(io_npz["audio"]), torch.from_numpy(io_npz["visual"]))


def _check_av_att(model, io_npz):
    out = _run(model, io_npz)
    np.testing.assert_allclose(out["logits"].softmax(-1).numpy(), io_npz["AV_att_probs"], **TOL)
    np.testing.assert_allclose(out["attention"].numpy(), io_npz["AV_att_attention"], **TOL)


def _check_dmrn(model, io_npz):
    out = _run(model, io_npz)
    np.testing.assert_allclose(out["logits"].softmax(-1).numpy(), io_npz["DMRN_probs"], **TOL)


# ------------------------------------------------------------------------------ official fixtures


@pytest.mark.parametrize("name", ["AV_att_whole_legacy.pt", "AV_att_whole_zip.pt", "AV_att_state_dict.pt"])
def test_av_att_reproduces_reference(orig, io_npz, name):
    model, card = load_original(orig / name)
    assert not model.training and card.source["kind"] == "av_att"
    assert card.model == "av_att" and card.task == "supervised" and len(card.class_names) == 29
    _check_av_att(model, io_npz)


def test_dmrn_reproduces_reference(orig, io_npz):
    model, card = load_original(orig / "DMRN_whole_legacy.pt")
    assert card.source["kind"] == "dmrn" and card.model == "dmrn" and not model.training
    assert model.blocks == 1
    _check_dmrn(model, io_npz)


def test_weak_reproduces_reference(orig, io_npz):
    model, card = load_original(orig / "AV_att_weak_whole_legacy.pt")
    assert card.source["kind"] == "av_att_weak" and card.model == "av_att" and card.task == "weak"
    logits = _run(model, io_npz)["logits"]
    np.testing.assert_allclose(logits.numpy(), io_npz["AV_att_weak_segment_scores"], **TOL)
    video = logits.max(dim=1).values.softmax(-1)
    np.testing.assert_allclose(video.numpy(), io_npz["AV_att_weak_video_probs"], **TOL)


def test_read_original_metadata(orig):
    legacy = read_original(orig / "DMRN_whole_legacy.pt")
    assert (legacy.kind, legacy.class_name, legacy.format) == ("dmrn", "models_fusion.TBMRF_Net", "legacy")
    assert legacy.extra == {"hidden_dim": 128, "nb_block": 1}
    assert legacy.locations == ("cpu",)
    assert legacy.state_dict["U_v.0.weight"].shape == (256, 256)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in legacy.state_dict.values())
    sd = read_original(orig / "AV_att_state_dict.pt")
    assert (sd.kind, sd.class_name, sd.format) == ("state_dict", None, "zip")
    whole = read_original(orig / "AV_att_whole_zip.pt")
    assert list(sd.state_dict) == list(whole.state_dict)
    assert all(torch.equal(sd.state_dict[k], whole.state_dict[k]) for k in sd.state_dict)


def test_state_dict_kind(orig, tmp_path, io_npz):
    weak, card = load_original(orig / "AV_att_state_dict.pt", kind="av_att_weak")
    assert card.source["kind"] == "av_att_weak"
    # A DMRN state dict is recognised from its keys.
    path = tmp_path / "dmrn_sd.pt"
    _write_zip(path, read_original(orig / "DMRN_whole_legacy.pt").state_dict)
    model, card = load_original(path)
    assert card.source["kind"] == "dmrn"
    _check_dmrn(model, io_npz)
    with pytest.raises(ValueError, match="kind"):
        load_original(path, kind="nonsense")


# ------------------------------------------------------------- a pickler that writes torch's layouts


def _global(module: str, name: str) -> type:
    """A class that pickles as GLOBAL 'module name' (no such object needs to exist)."""
    return type(name, (), {"_global": (module, name)})


REBUILD_V2 = _global("torch._utils", "_rebuild_tensor_v2")
REBUILD_V1 = _global("torch._utils", "_rebuild_tensor")          # PyTorch 0.3
REBUILD_PARAM = _global("torch._utils", "_rebuild_parameter")
PARAMETER_03 = _global("torch.nn.parameter", "Parameter")         # PyTorch 0.3
THNN_BACKEND = _global("torch.nn.backends.thnn", "_get_thnn_function_backend")


class _Storage:
    def __init__(self, key: str, data: torch.Tensor):
        self.key, self.data = key, data.detach().reshape(-1).contiguous()


class _Reduce:
    """Pickles as REDUCE(func, args) [+ BUILD(state)]."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce_ex__(self, proto):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _module(cls: type, params=None, children=None, **attrs):
    """An instance of ``cls`` that pickles as NEWOBJ(cls) + BUILD(state), like an nn.Module."""
    obj = cls.__new__(cls)
    obj.__dict__.update({"training": False, "_parameters": OrderedDict(params or {}), "_buffers": OrderedDict(),
                         "_modules": OrderedDict(children or {}), **attrs})
    return obj


class _Writer(pickle._Pickler):
    def __init__(self, f, *, legacy: bool, location: str, storage_type: type, source):
        super().__init__(f, protocol=2)
        self.legacy, self.location, self.storage_type, self.source = legacy, location, storage_type, source
        self.storages: dict[str, _Storage] = {}
        self.classes: set[type] = set()

    def save_global(self, obj, name=None):
        spec = getattr(obj, "_global", None)
        if spec is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{spec[0]}\n{spec[1]}\n".encode())
        self.memoize(obj)

    def persistent_id(self, obj):
        if self.legacy and isinstance(obj, type) and getattr(obj, "_is_module", False) and obj not in self.classes:
            self.classes.add(obj)     # as torch: a module class becomes a persistent id at its first use only
            return ("module", obj) + self.source
        if isinstance(obj, _Storage):
            self.storages[obj.key] = obj
            pid = ("storage", self.storage_type, obj.key, self.location, obj.data.numel())
            return pid + (getattr(obj, "view", None),) if self.legacy else pid
        return None


def _dump(obj, *, legacy, location, storage_type, source=(None, None)):
    buf = io.BytesIO()
    w = _Writer(buf, legacy=legacy, location=location, storage_type=storage_type, source=source)
    w.dump(obj)
    return buf.getvalue(), w.storages


def _write_legacy(path, obj, *, location="cpu", storage_type=None, source=(None, None)):
    storage_type = storage_type or _global("torch", "FloatStorage")
    main, storages = _dump(obj, legacy=True, location=location, storage_type=storage_type, source=source)
    with open(path, "wb") as f:
        for head in (0x1950A86A20F9469CFC6C, 1001,
                     {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(head, f, protocol=2)
        f.write(main)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            data = storages[key].data
            f.write(struct.pack("<q", data.numel()) + data.numpy().tobytes())


def _tensor_v2(storage: _Storage, t: torch.Tensor) -> _Reduce:
    return _Reduce(REBUILD_V2, (storage, 0, tuple(t.shape), t.stride(), False, OrderedDict()))


def _write_zip(path, state_dict, *, location="cpu"):
    refs, entries = OrderedDict(), {}
    for i, (name, t) in enumerate(state_dict.items()):
        refs[name] = _tensor_v2(_Storage(str(i), t), t)
        entries[str(i)] = t.contiguous().numpy().tobytes()
    main, _ = _dump(refs, legacy=False, location=location, storage_type=_global("torch", "FloatStorage"))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", main)
        zf.writestr("archive/byteorder", "little")
        for key, raw in entries.items():
            zf.writestr(f"archive/data/{key}", raw)


def _release_like_av_att(state_dict) -> _Reduce:
    """An att_Net object graph as PyTorch 0.3 pickled it on a GPU machine."""
    def cls(module, name):
        c = _global(module, name)
        c._is_module = True
        return c

    linear, lstm = cls("torch.nn.modules.linear", "Linear"), cls("torch.nn.modules.rnn", "LSTM")
    unserializable = _global("torch.backends.cudnn.rnn", "Unserializable")
    unserializable.__getstate__ = lambda self: "<unserializable>"
    groups: dict[str, dict] = OrderedDict()
    for i, (name, t) in enumerate(state_dict.items()):
        child, pname = name.split(".", 1)
        tensor = _Reduce(REBUILD_V1, (_Storage(f"1400{i:02d}", t), 0, tuple(t.shape), t.stride()))
        groups.setdefault(child, OrderedDict())[pname] = _Reduce(PARAMETER_03, (tensor,), (True, False, OrderedDict()))
    backend = _Reduce(THNN_BACKEND, ())
    children = OrderedDict()
    for child, params in groups.items():
        if child.startswith("lstm"):
            drop = {"desc_0": unserializable()}
            children[child] = _module(lstm, params, _backend=backend, dropout_state=drop,
                                      _all_weights=[list(params)[:4], list(params)[4:]])
        else:
            children[child] = _module(linear, params, _backend=backend)
    children["relu"] = _module(cls("torch.nn.modules.activation", "ReLU"), _backend=backend)
    return _module(cls("models", "att_Net"), children=children, hidden_dim=128, _backend=backend)


def test_release_like_file_cuda_and_source_text(orig, tmp_path, io_npz):
    """0.3-era layout: torch.cuda storages at 'cuda:0', _rebuild_tensor, Parameter, class source strings."""
    sd = read_original(orig / "AV_att_whole_legacy.pt").state_dict
    path = tmp_path / "AV_att.pt"
    source = ("/home/user/AVE/models.py", "class att_Net(nn.Module):\n    import os; os.system('touch pwned')\n")
    _write_legacy(path, _release_like_av_att(sd), location="cuda:0",
                  storage_type=_global("torch.cuda", "FloatStorage"), source=source)
    ckpt = read_original(path)
    assert ckpt.locations == ("cuda:0",) and ckpt.format == "legacy" and ckpt.class_name == "models.att_Net"
    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
    model, _ = load_original(path)
    _check_av_att(model, io_npz)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_zip_cuda_location_maps_to_cpu(orig, tmp_path, io_npz):
    path = tmp_path / "sd_cuda.pt"
    _write_zip(path, read_original(orig / "AV_att_state_dict.pt").state_dict, location="cuda:1")
    assert read_original(path).locations == ("cuda:1",)
    _check_av_att(load_original(path).model, io_npz)


def test_legacy_storage_view(tmp_path):
    base = torch.arange(10, dtype=torch.float64)
    storage = _Storage("99", base)
    storage.view = ("77", 4, 6)
    ref = _Reduce(REBUILD_V2, (storage, 0, (3, 2), (2, 1), False, OrderedDict()))
    path = tmp_path / "view.pt"
    _write_legacy(path, OrderedDict(w=ref), storage_type=_global("torch", "DoubleStorage"))
    got = read_original(path).state_dict["w"]
    assert got.dtype == torch.float32
    assert torch.equal(got, base[4:10].reshape(3, 2).float())


# ----------------------------------------------------------------------------------------- safety


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _evil_files(tmp_path):
    target = tmp_path / "pwned"
    evil = {"w": torch.zeros(2), "x": _Evil(target)}
    zip_path, legacy_path, raw_path = tmp_path / "evil_zip.pt", tmp_path / "evil_legacy.pt", tmp_path / "evil.pkl"
    torch.save(evil, zip_path)
    torch.save(evil, legacy_path, _use_new_zipfile_serialization=False)
    with open(raw_path, "wb") as f:
        pickle.dump(_Evil(target), f, protocol=2)
    return target, [zip_path, legacy_path, raw_path]


def test_malicious_pickles_are_refused(tmp_path):
    target, paths = _evil_files(tmp_path)
    for path in paths:
        for loader in (read_original, load_original):
            with pytest.raises(UnsafeCheckpointError, match="system") as info:
                loader(path)
            assert path.name in str(info.value)
            assert isinstance(info.value, ValueError)
        assert not target.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("__builtin__", "getattr"), ("subprocess", "Popen"),
                                         ("torch", "load"), ("torch.nn.modules.linear", "Linear.__init__")])
def test_other_globals_are_refused(tmp_path, module, name):
    path = tmp_path / "g.pt"
    _write_legacy(path, OrderedDict(w=_Reduce(_global(module, name), ("1+1",))))
    with pytest.raises(UnsafeCheckpointError, match=name.split(".")[-1]):
        read_original(path)


def test_stand_in_classes_are_inert(tmp_path):
    """A class on the allow-list is only a recorder: BUILD cannot turn it into anything else."""
    linear = _global("torch.nn.modules.linear", "Linear")
    path = tmp_path / "top_linear.pt"
    _write_legacy(path, _module(linear, {"weight": _tensor_v2(_Storage("1", torch.ones(2)), torch.ones(2))}))
    with pytest.raises(OriginalCheckpointError, match="not an official AVE model"):
        read_original(path)
    # BUILD cannot set attributes on allow-listed classes or functions (slot state or dict state).
    def op_global(module, name):
        return pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def op_str(text):
        return pickle.BINUNICODE + struct.pack("<I", len(text)) + text.encode()

    for target in (op_global("models", "att_Net"), op_global("torch._utils", "_rebuild_tensor_v2"),
                   op_global("torch", "FloatStorage")):
        for state in (pickle.NONE + pickle.EMPTY_DICT + op_str("__setstate__") + op_global("builtins", "set")
                      + pickle.SETITEM + pickle.TUPLE2,
                      pickle.EMPTY_DICT + op_str("fn") + op_global("builtins", "set") + pickle.SETITEM):
            path = tmp_path / "poke.pt"
            path.write_bytes(pickle.PROTO + b"\x02" + target + state + pickle.BUILD + pickle.STOP)
            with pytest.raises(OriginalCheckpointError, match="poke.pt"):
                read_original(path)


# ---------------------------------------------------------------------------------- bad checkpoints


@pytest.mark.parametrize("name,keep", [("AV_att_whole_legacy.pt", 0.5), ("AV_att_whole_legacy.pt", 1000),
                                       ("AV_att_whole_legacy.pt", 50), ("AV_att_whole_zip.pt", 0.5)])
def test_truncated_file(orig, tmp_path, name, keep):
    raw = (orig / name).read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    path = tmp_path / f"cut_{name}"
    path.write_bytes(raw[:n])
    with pytest.raises(OriginalCheckpointError, match="cut_") as info:
        load_original(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(OriginalCheckpointError, match="empty.pt"):
        read_original(tmp_path / "empty.pt")
    with pytest.raises(OriginalCheckpointError, match="nothere.pt"):
        read_original(tmp_path / "nothere.pt")


def test_unknown_and_missing_keys(orig, tmp_path):
    sd = read_original(orig / "AV_att_state_dict.pt").state_dict
    extra = OrderedDict(sd, **{"foo.weight": torch.zeros(3)})
    path = tmp_path / "extra.pt"
    _write_zip(path, extra)
    with pytest.raises(OriginalCheckpointError, match=r"extra\.pt.*unknown parameters \['foo\.weight'\]"):
        load_original(path)
    fewer = OrderedDict((k, v) for k, v in sd.items() if k != "L2.bias")
    path = tmp_path / "fewer.pt"
    _write_zip(path, fewer)
    with pytest.raises(OriginalCheckpointError, match=r"fewer\.pt.*missing parameters \['head\.L2\.bias'\]"):
        load_original(path)
    no_attention = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("affine_v."))
    path = tmp_path / "noatt.pt"
    _write_zip(path, no_attention)
    with pytest.raises(OriginalCheckpointError, match="affine_v.weight"):
        load_original(path)


# ------------------------------------------------------------------------------------------ Keras


@pytest.fixture(scope="module")
def cml_io(orig):
    return _npz(orig / "cml_io.npz")


def _check_cml(model, cml_io):
    with torch.no_grad():
        d = model(torch.from_numpy(cml_io["audio_vec"]), torch.from_numpy(cml_io["video_vec"]))["distance"]
    np.testing.assert_allclose(d.numpy(), cml_io["distances"], **TOL)


def test_keras_cml_reproduces_reference(ave_dir, cml_io):
    model, card = load_keras_cml(ave_dir / "cmm_model_weights.h5")
    assert not model.training and card.model == "cml" and card.task == "cml"
    _check_cml(model, cml_io)


def _copy_keras(src, dst, *, under=None, skip=(), reshape=None):
    with h5py.File(src, "r") as fi, h5py.File(dst, "w") as fo:
        for k, v in fi.attrs.items():
            fo.attrs[k] = v
        root = fo.create_group(under) if under else fo
        for layer in fi:
            if layer in skip:
                continue
            g = root.create_group(layer)
            for k, v in fi[layer].attrs.items():
                g.attrs[k] = v

            def copy(name, obj, g=g, layer=layer):
                if isinstance(obj, h5py.Dataset):
                    data = obj[()]
                    if reshape and reshape[0] == layer and name.endswith("kernel:0"):
                        data = np.zeros(reshape[1], dtype=data.dtype)
                    g.create_dataset(name, data=data)

            fi[layer].visititems(copy)


def test_keras_model_weights_group(ave_dir, tmp_path, cml_io):
    path = tmp_path / "full_model.h5"
    _copy_keras(ave_dir / "cmm_model_weights.h5", path, under="model_weights")
    _check_cml(load_keras_cml(path).model, cml_io)


def test_keras_missing_layer(ave_dir, tmp_path):
    path = tmp_path / "no_dense4.h5"
    _copy_keras(ave_dir / "cmm_model_weights.h5", path, skip=("dense_4",))
    with pytest.raises(KerasWeightsError, match=r"no_dense4\.h5.*'dense_4'"):
        load_keras_cml(path)


def test_keras_shape_mismatch(ave_dir, tmp_path):
    path = tmp_path / "bad_shape.h5"
    _copy_keras(ave_dir / "cmm_model_weights.h5", path, reshape=("dense_2", (100, 64)))
    with pytest.raises(KerasWeightsError, match=r"bad_shape\.h5.*'dense_2'"):
        load_keras_cml(path)
    path = tmp_path / "bad_bias.h5"
    _copy_keras(ave_dir / "cmm_model_weights.h5", path, reshape=("dense_3", (128, 127)))
    with pytest.raises(KerasWeightsError, match=r"bad_bias\.h5.*'dense_3'"):
        load_keras_cml(path)
