"""Official AVE checkpoints (``AV_att.pt``, ``AV_att_weak.pt``, ``DMRN.pt``) without running pickled code.

The release files are whole ``nn.Module`` objects pickled by ``torch.save`` (PyTorch 0.3, legacy
non-zip stream). They are read here with a restricted unpickler: only an allow-list of globals
resolves, every module class becomes an inert stand-in that merely records its state, storages are
plain byte records read by this module, and every storage location is mapped to the CPU.
``torch.load`` is never called.

Legacy stream: five pickles (magic number, protocol version, sys info, the object, the storage key
list), then for each key an int64 little-endian element count and the raw little-endian bytes.
Zip format: ``<name>/data.pkl`` plus ``<name>/data/<key>`` raw bytes.
"""
from __future__ import annotations

import io
import logging
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.errors import DataError

log = logging.getLogger(__name__)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Official class -> kind.
OFFICIAL_CLASSES = {
    "models.att_Net": "av_att",
    "models_weakly.att_Net": "av_att_weak",
    "models_fusion.TBMRF_Net": "dmrn",
}
KINDS = ("av_att", "av_att_weak", "dmrn")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_MODULE_RENAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
# Root attributes that are nn.Module machinery, not model hyper-parameters.
_MODULE_MACHINERY = {"training", "dump_patches"}


class OriginalCheckpointError(DataError):
    """An official checkpoint that cannot be read or does not fit the model; names the file."""


class UnsafeCheckpointError(OriginalCheckpointError):
    """The pickle asks for a global outside the allow-list; nothing was executed."""


@dataclass
class OriginalCheckpoint:
    """What an official checkpoint holds, as plain data."""

    path: Path
    kind: str                                 # av_att | dmrn | av_att_weak | state_dict
    class_name: str | None                    # e.g. 'models.att_Net'; None for a plain state dict
    state_dict: "OrderedDict[str, torch.Tensor]"
    format: str                               # legacy | zip
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. hidden_dim, nb_block
    locations: tuple[str, ...] = ()           # storage locations as written (all mapped to CPU)


# --------------------------------------------------------------------------- inert pickle objects


class _Frozen:
    """Base for allow-listed objects: pickle's BUILD cannot set attributes on them."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")


class _StorageType(_Frozen):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)


class _Storage(_Frozen):
    """A storage named in a persistent id; its bytes are read after unpickling."""

    __slots__ = ("key", "dtype", "numel", "location")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str):
        for k, v in (("key", key), ("dtype", dtype), ("numel", numel), ("location", location)):
            object.__setattr__(self, k, v)


class _StorageView(_Frozen):
    """A slice of a storage (legacy ``view_metadata``)."""

    __slots__ = ("root", "offset", "numel")

    def __init__(self, root: _Storage, offset: int, numel: int):
        for k, v in (("root", root), ("offset", offset), ("numel", numel)):
            object.__setattr__(self, k, v)


class _TensorRef(_Frozen):
    """A tensor to build once the storage bytes are known."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        for k, v in (("storage", storage), ("offset", offset), ("size", size), ("stride", stride)):
            object.__setattr__(self, k, v)

    def __setstate__(self, state):  # PyTorch 0.3 Parameter BUILD (requires_grad, ...): ignored
        pass


class _InertType(type):
    """Metaclass of the stand-ins: their class attributes cannot be changed from a pickle."""

    def __setattr__(cls, name, value):
        raise AttributeError(f"stand-in class {cls.__name__} is read-only")


class _InertModule(metaclass=_InertType):
    """Stand-in for a pickled module class: records the pickled state and does nothing else."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_avel_args"] = args

    def __setstate__(self, state):
        self.__dict__["_avel_state"] = state

    def __setattr__(self, name, value):
        raise AttributeError(f"stand-in {self.qualname} is read-only")

    @property
    def state(self) -> dict:
        state = self.__dict__.get("_avel_state")
        if isinstance(state, tuple) and len(state) == 2:   # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        return state if isinstance(state, dict) else {}


class _Callable(_Frozen):
    """An allow-listed callable implemented here (never the torch function of that name)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _check_storage(obj) -> None:
    if not isinstance(obj, (_Storage, _StorageView)):
        raise TypeError(f"tensor rebuilt from {type(obj).__name__}, not a storage")


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    _check_storage(storage)
    if not isinstance(storage_offset, int) or not all(isinstance(v, int) for v in (*size, *stride)):
        raise TypeError("tensor offset, size and stride must be integers")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *rest):
    if not isinstance(data, _TensorRef):
        raise TypeError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _make_none(*args, **kwargs):
    return None


_SAFE_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,             # PyTorch 0.3
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.nn.parameter.Parameter": _rebuild_parameter,          # PyTorch 0.3: REDUCE(Parameter, (data,))
    "torch.nn.backends.thnn._get_thnn_function_backend": _make_none,   # PyTorch 0.3 Module._backend
}
_SAFE_TYPES = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.list": list,
    "builtins.dict": dict,
    "builtins.tuple": tuple,
}
# Non-module classes that old files carry and that are safe to record as inert stand-ins.
_INERT_EXTRA = {"torch.backends.cudnn.rnn.Unserializable"}


def _is_module_class(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if full in OFFICIAL_CLASSES or full in _INERT_EXTRA:
        return True
    return module.startswith("torch.nn.modules.") and name.isidentifier()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; module classes become inert stand-ins."""

    def __init__(self, file, *, source: str, storages: dict[str, _Storage]):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._storages = storages
        self._views: dict[str, _StorageView] = {}
        self._classes: dict[str, type] = {}
        self.locations: set[str] = set()

    def find_class(self, module: str, name: str):
        module = _MODULE_RENAMES.get(module, module)
        full = f"{module}.{name}"
        if full in _SAFE_GLOBALS:
            return _Callable(_SAFE_GLOBALS[full])
        if full in _SAFE_TYPES:
            return _SAFE_TYPES[full]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(full, _STORAGE_DTYPES[name])
        if _is_module_class(module, name):
            if full not in self._classes:
                self._classes[full] = _InertType(name, (_InertModule,), {"qualname": full, "__slots__": ()})
            return self._classes[full]
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load: the pickle asks for global {full!r}, which is not on "
            "the allow-list of an official AVE checkpoint (nothing was executed)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise OriginalCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        tag = pid[0].decode("latin1") if isinstance(pid[0], bytes) else pid[0]
        if tag == "module":
            # ('module', class, source_file, source): the source text is ignored, never compiled.
            if len(pid) < 2 or not (isinstance(pid[1], type) and issubclass(pid[1], _InertModule)):
                raise OriginalCheckpointError(f"{self._source}: bad module persistent id {pid[:2]!r}")
            if len(pid) > 3 and pid[3]:
                log.debug("%s: ignoring the recorded source of %s", self._source, pid[1].qualname)
            return pid[1]
        if tag == "storage":
            return self._storage(pid)
        raise OriginalCheckpointError(f"{self._source}: unknown persistent id type {tag!r}")

    def _storage(self, pid: tuple):
        if len(pid) not in (5, 6):
            raise OriginalCheckpointError(f"{self._source}: bad storage persistent id of length {len(pid)}")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise OriginalCheckpointError(f"{self._source}: storage of unknown type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(location, str) or not isinstance(numel, int) or numel < 0:
            raise OriginalCheckpointError(f"{self._source}: malformed storage persistent id {pid!r}")
        self.locations.add(location)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.dtype, numel, location)
        elif storage.dtype != storage_type.dtype or storage.numel != numel:
            raise OriginalCheckpointError(f"{self._source}: storage {key!r} declared twice with different types")
        if view is None:
            return storage
        try:
            view_key, offset, view_size = view
        except (TypeError, ValueError):
            raise OriginalCheckpointError(f"{self._source}: malformed storage view {view!r}") from None
        if not all(isinstance(v, int) for v in (offset, view_size)) or offset < 0 or offset + view_size > numel:
            raise OriginalCheckpointError(f"{self._source}: storage view {view!r} out of bounds")
        return self._views.setdefault(str(view_key), _StorageView(storage, offset, view_size))


# --------------------------------------------------------------------------------- file formats


_PARSE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                 KeyError, struct.error, UnicodeDecodeError, OverflowError, RecursionError, zipfile.BadZipFile)


def _unpickle(data_or_file, source: str, storages: dict[str, _Storage]):
    file = io.BytesIO(data_or_file) if isinstance(data_or_file, bytes) else data_or_file
    up = _RestrictedUnpickler(file, source=source, storages=storages)
    return up.load(), up.locations


def _frombytes(raw: bytes | bytearray, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).clone()


def _read_legacy(f, source: str):
    storages: dict[str, _Storage] = {}
    magic, _ = _unpickle(f, source, storages)
    if magic != LEGACY_MAGIC:
        raise OriginalCheckpointError(f"{source}: not a PyTorch checkpoint (bad magic number)")
    protocol, _ = _unpickle(f, source, storages)
    if protocol != LEGACY_PROTOCOL:
        raise OriginalCheckpointError(f"{source}: unsupported legacy protocol version {protocol!r}")
    sys_info, _ = _unpickle(f, source, storages)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise OriginalCheckpointError(f"{source}: big-endian checkpoints are not supported")
    obj, locations = _unpickle(f, source, storages)
    keys, _ = _unpickle(f, source, storages)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise OriginalCheckpointError(f"{source}: malformed storage key list")
    data: dict[str, torch.Tensor] = {}
    size = os.fstat(f.fileno()).st_size
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise OriginalCheckpointError(f"{source}: storage record {key!r} is not referenced by the pickle")
        head = f.read(8)
        if len(head) != 8:
            raise OriginalCheckpointError(f"{source}: file is truncated (storage record {key!r} missing)")
        count = struct.unpack("<q", head)[0]
        if count != storage.numel:
            raise OriginalCheckpointError(
                f"{source}: storage {key!r} holds {count} elements, the pickle says {storage.numel}")
        nbytes = count * storage.dtype.itemsize
        if nbytes > size - f.tell():
            raise OriginalCheckpointError(f"{source}: file is truncated inside storage record {key!r}")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise OriginalCheckpointError(f"{source}: file is truncated inside storage record {key!r}")
        data[key] = _frombytes(raw, storage.dtype, count)
    if f.read(1):
        log.warning("%s: trailing bytes after the last storage record were ignored", source)
    return obj, data, storages, locations


def _read_zip(path: Path, source: str):
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(names) != 1:
            raise OriginalCheckpointError(f"{source}: zip archive has {len(names)} '<name>/data.pkl' entries, expected 1")
        prefix = names[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise OriginalCheckpointError(f"{source}: big-endian checkpoints are not supported")
        obj, locations = _unpickle(zf.read(names[0]), source, storages)
        data: dict[str, torch.Tensor] = {}
        for key, storage in storages.items():
            entry = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(entry)
            except KeyError:
                raise OriginalCheckpointError(f"{source}: storage {key!r} is missing from the archive") from None
            nbytes = storage.numel * storage.dtype.itemsize
            if info.file_size != nbytes:
                raise OriginalCheckpointError(
                    f"{source}: storage {key!r} has {info.file_size} bytes, expected {nbytes}")
            data[key] = _frombytes(zf.read(entry), storage.dtype, storage.numel)
    return obj, data, storages, locations


def _materialize(ref: _TensorRef, data: dict[str, torch.Tensor], source: str, name: str) -> torch.Tensor:
    storage, offset = ref.storage, ref.offset
    if isinstance(storage, _StorageView):
        storage, offset, limit = storage.root, offset + storage.offset, storage.offset + storage.numel
    else:
        limit = storage.numel
    flat = data.get(storage.key)
    if flat is None:
        raise OriginalCheckpointError(f"{source}: no data for storage {storage.key!r} of {name!r}")
    if len(ref.size) != len(ref.stride) or any(v < 0 for v in (*ref.size, *ref.stride)) or offset < 0:
        raise OriginalCheckpointError(f"{source}: tensor {name!r} has an invalid size/stride")
    extent = offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) + 1
    if math.prod(ref.size) > 0 and extent > limit:
        raise OriginalCheckpointError(f"{source}: tensor {name!r} reaches past the end of its storage")
    t = torch.as_strided(flat, ref.size, ref.stride, offset).clone()
    return t.float() if t.is_floating_point() else t


def _flatten(root, source: str) -> tuple[OrderedDict, dict[str, Any]]:
    """Stand-in module tree or plain mapping -> (name -> _TensorRef, extra root attributes)."""
    refs: OrderedDict[str, _TensorRef] = OrderedDict()
    if isinstance(root, dict):
        for name, value in root.items():
            if not isinstance(name, str) or not isinstance(value, _TensorRef):
                raise OriginalCheckpointError(f"{source}: state dict entry {name!r} is not a tensor")
            refs[name] = value
        return refs, {}

    def walk(mod: _InertModule, prefix: str, depth: int) -> None:
        if depth > 64:
            raise OriginalCheckpointError(f"{source}: module tree is too deep")
        state = mod.state
        skip = state.get("_non_persistent_buffers_set") or ()
        for group in ("_parameters", "_buffers"):
            for name, value in (state.get(group) or {}).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, _TensorRef):
                    raise OriginalCheckpointError(f"{source}: {prefix}{name} is not a tensor")
                refs[f"{prefix}{name}"] = value
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, _InertModule):
                raise OriginalCheckpointError(f"{source}: submodule {prefix}{name} is not a module")
            walk(child, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    extra = {k: v for k, v in root.state.items()
             if not k.startswith("_") and k not in _MODULE_MACHINERY
             and isinstance(v, (bool, int, float, str))}
    return refs, extra


def read_original(path: str | Path) -> OriginalCheckpoint:
    """Read an official AVE checkpoint (legacy stream or zip) into plain CPU tensors, executing nothing."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise OriginalCheckpointError(f"{source}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            if is_zip:
                fmt = "zip"
                obj, data, storages, locations = _read_zip(path, source)
            else:
                fmt = "legacy"
                obj, data, storages, locations = _read_legacy(f, source)
    except OriginalCheckpointError:
        raise
    except _PARSE_ERRORS as e:
        raise OriginalCheckpointError(
            f"{source}: not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None

    if isinstance(obj, _InertModule):
        class_name = type(obj).qualname
        kind = OFFICIAL_CLASSES.get(class_name)
        if kind is None:
            raise OriginalCheckpointError(f"{source}: top-level object is {class_name}, not an official AVE model")
    elif isinstance(obj, dict):
        class_name, kind = None, "state_dict"
    else:
        raise OriginalCheckpointError(f"{source}: top-level object is a {type(obj).__name__}, "
                                      "neither a model nor a state dict")
    refs, extra = _flatten(obj, source)
    state_dict = OrderedDict((name, _materialize(ref, data, source, name)) for name, ref in refs.items())
    non_cpu = sorted(loc for loc in locations if loc != "cpu")
    if non_cpu:
        log.info("%s: storages saved on %s, mapped to the CPU", source, ", ".join(non_cpu))
    log.info("%s: %s checkpoint (%s), %d tensors", source, kind, fmt, len(state_dict))
    return OriginalCheckpoint(path=path, kind=kind, class_name=class_name, state_dict=state_dict,
                              format=fmt, extra=extra, locations=tuple(sorted(locations)))


# ---------------------------------------------------------------------------- avel model mapping


_ATTENTION = ("affine_audio.", "affine_video.", "affine_v.", "affine_g.", "affine_h.")


def _rename(name: str, model: str) -> str:
    if name.startswith(_ATTENTION):
        return f"attention.{name}"
    if model == "av_att" and name.startswith(("L1.", "L2.")):
        return f"head.{name}"
    return name


def _shape(sd: dict, name: str, source: str) -> torch.Size:
    if name not in sd:
        raise OriginalCheckpointError(f"{source}: required parameter {name!r} is missing")
    return sd[name].shape


def _model_kwargs(sd: dict, model: str, extra: dict, source: str) -> dict[str, Any]:
    att_hidden, audio_dim = _shape(sd, "affine_audio.weight", source)
    _, visual_dim = _shape(sd, "affine_video.weight", source)
    regions = _shape(sd, "affine_v.weight", source)[0]
    side = math.isqrt(regions)
    if side * side != regions:
        raise OriginalCheckpointError(f"{source}: {regions} attention regions do not form a square grid")
    hidden = _shape(sd, "lstm_audio.weight_hh_l0", source)[1]
    kwargs: dict[str, Any] = dict(audio_dim=audio_dim, visual_dim=visual_dim, grid=(side, side),
                                  num_classes=_shape(sd, "L2.weight", source)[0], hidden=hidden,
                                  att_hidden=att_hidden)
    if model == "av_att":
        kwargs["head_hidden"] = _shape(sd, "L1.weight", source)[0]
    else:
        kwargs["blocks"] = int(extra.get("nb_block", 1))
    return kwargs


def load_original(path: str | Path, *, kind: str | None = None) -> nn.Module:
    """Official checkpoint -> equivalent avel model (``av_att`` or ``dmrn``) in eval mode.

    ``kind`` ('av_att', 'av_att_weak', 'dmrn') is needed only to override what the file says; a
    plain state dict is ``dmrn`` when it has ``U_v.*`` keys and ``av_att`` otherwise.
    """
    from ..models import build_model

    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ckpt = read_original(path)
    source = str(ckpt.path)
    if kind is None:
        if ckpt.kind != "state_dict":
            kind = ckpt.kind
        else:
            kind = "dmrn" if any(k.startswith("U_v.") for k in ckpt.state_dict) else "av_att"
    elif ckpt.kind != "state_dict" and kind != ckpt.kind:
        log.warning("%s: file holds %s but kind=%r was asked for", source, ckpt.class_name, kind)
    model_name = "dmrn" if kind == "dmrn" else "av_att"

    sd = ckpt.state_dict
    model = build_model(model_name, **_model_kwargs(sd, model_name, ckpt.extra, source))
    mapped = {_rename(k, model_name): v for k, v in sd.items()}
    expected = model.state_dict()
    unexpected = sorted(k for k, n in zip(sd, mapped) if n not in expected)
    missing = sorted(set(expected) - set(mapped))
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unknown parameters {unexpected}")
        if missing:
            parts.append(f"missing parameters {missing}")
        raise OriginalCheckpointError(f"{source}: does not match avel model {model_name!r}: {'; '.join(parts)}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
           for k, v in mapped.items() if v.shape != expected[k].shape]
    if bad:
        raise OriginalCheckpointError(f"{source}: parameter shapes do not match: {bad}")
    model.load_state_dict(mapped, strict=True)
    model.eval()
    model.original_kind = kind
    model.original_class = ckpt.class_name
    model.original_path = source
    return model
