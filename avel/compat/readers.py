"""PyTorch checkpoint files (legacy stream or zip) -> plain CPU tensors, executing nothing.

Legacy stream: five pickles (magic number, protocol version, sys info, the object, the storage key
list), then for each key an int64 little-endian element count and the raw little-endian bytes.
Zip format: ``<name>/data.pkl`` plus ``<name>/data/<key>`` raw bytes, stored uncompressed.
``torch.load`` is never called. Every size a file declares is checked against the file's own size
and :class:`~avel.compat.limits.Limits` before anything is allocated.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.registry import available_models, model_class
from .inert import InertModule, Storage, StorageView, TensorRef
from .limits import DEFAULT_LIMITS, LEGACY_MAGIC, Limits, OriginalCheckpointError, brief
from .unpickler import unpickle, unpickle_bytes

log = logging.getLogger(__name__)

LEGACY_PROTOCOL = 1001
# The 2018 release classes -> kind.
OFFICIAL_CLASSES = {
    "models.att_Net": "av_att",
    "models_weakly.att_Net": "av_att_weak",
    "models_fusion.TBMRF_Net": "dmrn",
}
# Root attributes that are nn.Module machinery, not model hyper-parameters.
_MODULE_MACHINERY = {"training", "dump_patches"}
_PARSE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                 KeyError, struct.error, UnicodeDecodeError, OverflowError, RecursionError, MemoryError,
                 zipfile.BadZipFile, NotImplementedError, zipfile.LargeZipFile, RuntimeError, OSError)


@dataclass
class OriginalCheckpoint:
    """What an official checkpoint holds, as plain data."""

    path: Path
    kind: str                                 # a kind (av_att, psp, ...) | state_dict | module (ambiguous class)
    class_name: str | None                    # e.g. 'models.att_Net'; None for a plain state dict
    state_dict: OrderedDict[str, torch.Tensor]
    format: str                               # legacy | zip
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. hidden_dim, nb_block
    locations: tuple[str, ...] = ()           # storage locations as written (all mapped to CPU)
    dtypes: tuple[str, ...] = ()              # storage dtypes as written (e.g. 'float64')


def class_kinds() -> dict[str, tuple[str, ...]]:
    """Pickled top-level class -> the kinds that read it (the 2018 classes and every registered model's)."""
    out: dict[str, list[str]] = {cls: [kind] for cls, kind in OFFICIAL_CLASSES.items()}
    for name in available_models():
        top = getattr(model_class(name), "reference_classes", ())[:1]   # the first is the pickled model
        for cls in top:
            out.setdefault(cls, []).append(name)
    return {cls: tuple(kinds) for cls, kinds in out.items()}


def _module_prefixes() -> frozenset[str]:
    """Python modules whose classes may appear as inert stand-ins (those of the reference repositories)."""
    names = set(OFFICIAL_CLASSES)
    for name in available_models():
        names.update(getattr(model_class(name), "reference_classes", ()))
    return frozenset(n.rsplit(".", 1)[0] for n in names if "." in n)


# --------------------------------------------------------------------------------- file formats


def _check_budget(storages: dict[str, Storage], available: int, source: str, limits: Limits) -> None:
    """Declared storage sizes must fit the file and the element limit before any is allocated."""
    elements = sum(s.numel for s in storages.values())
    if elements > limits.max_elements:
        raise OriginalCheckpointError(f"{source}: storages declare {elements} values (at most {limits.max_elements})")
    nbytes = sum(s.numel * s.dtype.itemsize for s in storages.values())
    if nbytes > available:
        raise OriginalCheckpointError(
            f"{source}: storages declare {nbytes} bytes but the file has only {available} left (truncated?)")


def _empty(storage: Storage) -> tuple[torch.Tensor, memoryview]:
    t = torch.empty(storage.numel, dtype=storage.dtype)
    return t, memoryview(t.view(torch.uint8).numpy()) if storage.numel else memoryview(bytearray())


def _read_legacy(f, source: str, prefixes: frozenset[str], limits: Limits):
    storages: dict[str, Storage] = {}
    size = os.fstat(f.fileno()).st_size
    budget = min(limits.max_pickle_bytes, size)
    kw = dict(source=source, storages=storages, module_prefixes=prefixes, limits=limits)
    objs = []
    locations: set[str] = set()
    for _ in range(5):
        obj, locs, used = unpickle(f, budget, **kw)
        budget -= used
        locations |= locs
        objs.append(obj)
        if len(objs) == 1 and obj != LEGACY_MAGIC:
            raise OriginalCheckpointError(f"{source}: not a PyTorch checkpoint (bad magic number)")
        if len(objs) == 2 and obj != LEGACY_PROTOCOL:
            raise OriginalCheckpointError(f"{source}: unsupported legacy protocol version {brief(obj)}")
    sys_info, obj, keys = objs[2:]
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise OriginalCheckpointError(f"{source}: big-endian checkpoints are not supported")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise OriginalCheckpointError(f"{source}: malformed storage key list")
    missing = [k for k in keys if k not in storages]
    if missing or len(keys) != len(storages):
        raise OriginalCheckpointError(
            f"{source}: storage records {brief(missing or sorted(set(storages) - set(keys)))} do not match the pickle")
    _check_budget(storages, size - f.tell() - 8 * len(keys), source, limits)
    data: dict[str, torch.Tensor] = {}
    for key in keys:
        storage = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise OriginalCheckpointError(f"{source}: file is truncated (storage record {brief(key)} missing)")
        count = struct.unpack("<q", head)[0]
        if count != storage.numel:
            raise OriginalCheckpointError(
                f"{source}: storage {brief(key)} holds {count} elements, the pickle says {storage.numel}")
        t, buf = _empty(storage)
        if f.readinto(buf) != len(buf):
            raise OriginalCheckpointError(f"{source}: file is truncated inside storage record {brief(key)}")
        data[key] = t
    if f.read(1):
        log.warning("%s: trailing bytes after the last storage record were ignored", source)
    return obj, data, storages, locations


def _stored(zf: zipfile.ZipFile, name: str, nbytes: int | None, source: str, limits: Limits) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise OriginalCheckpointError(f"{source}: {brief(name)} is missing from the archive") from None
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise OriginalCheckpointError(
            f"{source}: zip entry {brief(name)} is compressed (torch writes stored entries only)")
    if nbytes is not None and info.file_size != nbytes:
        raise OriginalCheckpointError(
            f"{source}: storage entry {brief(name)} has {info.file_size} bytes, expected {nbytes}")
    return info


def _read_zip(path: Path, source: str, prefixes: frozenset[str], limits: Limits):
    storages: dict[str, Storage] = {}
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_zip_entries:
            raise OriginalCheckpointError(f"{source}: zip archive has {len(infos)} entries")
        names = [i.filename for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(names) != 1:
            raise OriginalCheckpointError(f"{source}: zip archive has {len(names)} '<name>/data.pkl' entries, expected 1")
        prefix = names[0][: -len("data.pkl")]
        if any(i.filename == f"{prefix}byteorder" for i in infos):
            if _stored(zf, f"{prefix}byteorder", None, source, limits).file_size > 16:
                raise OriginalCheckpointError(f"{source}: malformed byteorder entry")
            if zf.read(f"{prefix}byteorder").strip() != b"little":
                raise OriginalCheckpointError(f"{source}: big-endian checkpoints are not supported")
        info = _stored(zf, names[0], None, source, limits)
        if info.file_size > limits.max_pickle_bytes:
            raise OriginalCheckpointError(f"{source}: data.pkl has {info.file_size} bytes (at most {limits.max_pickle_bytes})")
        obj, locations, _ = unpickle_bytes(zf.read(info), source=source, storages=storages,
                                           module_prefixes=prefixes, limits=limits)
        # Each storage must be its own stored entry and together they must fit the archive: entries
        # that share bytes (a "zip bomb" of overlapping members) cannot multiply the data read.
        entries = {key: _stored(zf, f"{prefix}data/{key}", s.numel * s.dtype.itemsize, source, limits)
                   for key, s in storages.items()}
        _check_budget(storages, size, source, limits)
        data: dict[str, torch.Tensor] = {}
        for key, storage in storages.items():
            t, buf = _empty(storage)
            with zf.open(entries[key]) as member:
                if member.readinto(buf) != len(buf):
                    raise OriginalCheckpointError(f"{source}: storage entry {brief(key)} is truncated")
            data[key] = t
    return obj, data, storages, locations


# ----------------------------------------------------------------------------- tensors and names


def _check_layout(ref: TensorRef, limit: int, source: str, name: str) -> int:
    """Elements of ``ref`` after checking it lies inside its storage and no two elements overlap."""
    numel = 1
    for s in ref.size:
        numel *= s
    if numel == 0:
        return 0
    extent = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) + 1
    if extent > limit:
        raise OriginalCheckpointError(f"{source}: tensor {brief(name)} reaches past the end of its storage")
    reach = 0     # dimensions by increasing stride: each must step over everything the smaller ones cover
    for s, st in sorted(((s, st) for s, st in zip(ref.size, ref.stride) if s > 1), key=lambda p: p[1]):
        if st <= reach:
            raise OriginalCheckpointError(
                f"{source}: tensor {brief(name)} has overlapping strides {brief(ref.stride)} (refused)")
        reach += (s - 1) * st
    return numel


def _materialize(refs: OrderedDict[str, TensorRef], data: dict[str, torch.Tensor], source: str,
                 dtype: torch.dtype) -> OrderedDict[str, torch.Tensor]:
    layouts = []
    total = 0
    seen: set[int] = set()
    for name, ref in refs.items():
        storage, offset = ref.storage, ref.offset
        if isinstance(storage, StorageView):
            storage, offset, limit = storage.root, offset + storage.offset, storage.offset + storage.numel
        else:
            limit = storage.numel
        if storage.key not in data:
            raise OriginalCheckpointError(f"{source}: no data for storage {brief(storage.key)} of {brief(name)}")
        numel = _check_layout(TensorRef(storage, offset, ref.size, ref.stride), limit, source, name)
        if id(ref) not in seen:
            seen.add(id(ref))
            total += numel
        layouts.append((name, ref, storage, offset))
    stored = sum(t.numel() for t in data.values())
    if total > stored:
        raise OriginalCheckpointError(
            f"{source}: tensors hold {total} values but the storages only {stored} (overlapping views refused)")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    built: dict[int, torch.Tensor] = {}
    for name, ref, storage, offset in layouts:
        if id(ref) not in built:
            flat = data[storage.key]
            t = torch.as_strided(flat, ref.size, ref.stride, offset)
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            elif t.numel() != flat.numel():
                t = t.clone()       # do not keep a shared storage alive through a small view
            built[id(ref)] = t
        out[name] = built[id(ref)]
    return out


def _flatten(root, source: str, limits: Limits) -> tuple[OrderedDict[str, TensorRef], dict[str, Any]]:
    """Stand-in module tree or plain mapping -> (name -> TensorRef, extra root attributes)."""
    refs: OrderedDict[str, TensorRef] = OrderedDict()

    def add(name: str, value) -> None:
        if len(name) > limits.max_name:
            raise OriginalCheckpointError(f"{source}: parameter name {brief(name)} is too long")
        if not isinstance(value, TensorRef):
            raise OriginalCheckpointError(f"{source}: state dict entry {brief(name)} is not a tensor")
        if len(refs) >= limits.max_storages:
            raise OriginalCheckpointError(f"{source}: more than {limits.max_storages} tensors")
        refs[name] = value

    if isinstance(root, dict):
        for name, value in root.items():
            if not isinstance(name, str):
                raise OriginalCheckpointError(f"{source}: state dict key {brief(name)} is not a string")
            add(name, value)
        return refs, {}

    visits = 0
    todo = [(root, "")]
    while todo:       # depth-first in registration order, without recursion
        mod, prefix = todo.pop()
        visits += 1
        if visits > limits.max_modules:
            raise OriginalCheckpointError(f"{source}: more than {limits.max_modules} modules")
        state = mod.state
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else ()
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                raise OriginalCheckpointError(f"{source}: {brief(prefix + group)} is not a dict")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                add(f"{prefix}{name}", value)
        children = state.get("_modules") or {}
        if not isinstance(children, dict):
            raise OriginalCheckpointError(f"{source}: {brief(prefix + '_modules')} is not a dict")
        for name, child in reversed(list(children.items())):
            if child is None:
                continue
            if not isinstance(child, InertModule):
                raise OriginalCheckpointError(f"{source}: submodule {brief(f'{prefix}{name}')} is not a module")
            todo.append((child, f"{prefix}{name}."[: limits.max_name + 1]))
    extra = {k: v for k, v in root.state.items()
             if isinstance(k, str) and not k.startswith("_") and k not in _MODULE_MACHINERY
             and isinstance(v, (bool, int, float, str)) and (not isinstance(v, str) or len(v) <= limits.max_name)}
    return refs, extra


def read_original(path: str | Path, *, dtype: torch.dtype | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> OriginalCheckpoint:
    """Read a reference AVE checkpoint (legacy stream or zip) into CPU tensors, executing nothing.

    Floating tensors are cast to ``dtype`` (None: float32, avel's default).
    """
    path = Path(path)
    source = str(path)
    dtype = dtype or torch.float32
    if not path.is_file():
        raise OriginalCheckpointError(f"{source}: no such checkpoint file")
    prefixes = _module_prefixes()
    try:
        with open(path, "rb") as f:
            fmt = "zip" if f.read(4) == b"PK\x03\x04" else "legacy"
            f.seek(0)
            if fmt == "zip":
                obj, data, storages, locations = _read_zip(path, source, prefixes, limits)
            else:
                obj, data, storages, locations = _read_legacy(f, source, prefixes, limits)
        if isinstance(obj, InertModule):
            class_name = type(obj).qualname
            kinds = class_kinds().get(class_name, ())
            if not kinds:
                raise OriginalCheckpointError(
                    f"{source}: top-level object is {brief(class_name)}, not an official AVE model class")
            kind = kinds[0] if len(kinds) == 1 else "module"
        elif isinstance(obj, dict):
            class_name, kind = None, "state_dict"
        else:
            raise OriginalCheckpointError(f"{source}: top-level object is a {type(obj).__name__}, "
                                          "neither a model nor a state dict")
        refs, extra = _flatten(obj, source, limits)
        state_dict = _materialize(refs, data, source, dtype)
    except OriginalCheckpointError:
        raise
    except _PARSE_ERRORS as e:
        raise OriginalCheckpointError(
            f"{source}: not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(e).__name__}: {brief(e.args[0] if len(e.args) == 1 else e.args, 200)}") from None
    non_cpu = sorted(loc for loc in locations if loc != "cpu")
    if non_cpu:
        log.info("%s: storages saved on %s, mapped to the CPU", source, ", ".join(non_cpu))
    log.info("%s: %s checkpoint (%s), %d tensors", source, kind, fmt, len(state_dict))
    dtypes = tuple(sorted({str(s.dtype).removeprefix("torch.") for s in storages.values()}))
    return OriginalCheckpoint(path=path, kind=kind, class_name=class_name, state_dict=state_dict,
                              format=fmt, extra=extra, locations=tuple(sorted(locations)), dtypes=dtypes)
