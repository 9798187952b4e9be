"""A restricted, resource-bounded unpickler for PyTorch checkpoints: no pickled code runs.

It is the pure-Python unpickler of the standard library with an opcode allow-list: only the data
opcodes torch writes (protocols 2-4) are accepted, each one that could hash, copy or allocate
without bound is replaced by a checked version, only an allow-list of globals resolves, module
classes become inert stand-ins that merely record their state (:mod:`avel.compat.inert`), and
storages are plain records whose bytes the readers fetch later. After loading, the object graph is
checked for cycles and depth in time linear in its size.
"""
from __future__ import annotations

import codecs
import io
import logging
import pickle
import struct
from collections import OrderedDict

import torch

from .inert import (
    AllowedCallable,
    InertModule,
    InertType,
    Storage,
    StorageType,
    StorageView,
    TensorRef,
    check_graph,
)
from .limits import (
    LEGACY_MAGIC,
    Limits,
    OriginalCheckpointError,
    UnsafeCheckpointError,
    brief,
)

log = logging.getLogger(__name__)

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_MODULE_RENAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
# Non-module classes that old files carry and that are safe to record as inert stand-ins.
_INERT_EXTRA = frozenset({"torch.backends.cudnn.rnn.Unserializable"})
_SCALARS = (str, bytes, int, float, bool, type(None))


# ------------------------------------------------------------------------------------ reading


class BoundedReader:
    """File view for the unpickler: refuses reads past a byte budget or the end of the data."""

    def __init__(self, f, budget: int, limits: Limits):
        self._f, self._left, self._max_line = f, budget, limits.max_line

    def _take(self, n: int) -> None:
        if n < 0 or n > self._left:
            raise pickle.UnpicklingError(f"pickle asks for {n} bytes, more than the {self._left} left to it")
        self._left -= n

    def read(self, n: int) -> bytes:
        self._take(n)
        data = self._f.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:] = data
        return len(data)

    def readline(self) -> bytes:
        line = self._f.readline(min(self._max_line, self._left))
        self._take(len(line))
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError(f"pickle text line longer than {self._max_line} bytes or truncated")
        return line


class _Dispatch(dict):
    def __missing__(self, key):
        raise pickle.UnpicklingError(f"pickle opcode {bytes([key])!r} is not allowed in a checkpoint")


_PLAIN_OPS = (
    "PROTO STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 BINFLOAT FLOAT "
    "SHORT_BINSTRING SHORT_BINBYTES SHORT_BINUNICODE EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 "
    "EMPTY_LIST LIST APPEND APPENDS EMPTY_DICT EMPTY_SET GET BINGET LONG_BINGET PUT BINPUT "
    "LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL BINPERSID FRAME"
).split()


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only allow-listed globals; module classes become inert stand-ins."""

    dispatch = _Dispatch({getattr(pickle, op)[0]: pickle._Unpickler.dispatch[getattr(pickle, op)[0]]
                          for op in _PLAIN_OPS})

    def __init__(self, reader: BoundedReader, *, source: str, storages: dict[str, Storage],
                 module_prefixes: frozenset[str], limits: Limits):
        super().__init__(reader, encoding="latin1")
        self._source, self._storages, self._limits = source, storages, limits
        self._prefixes = module_prefixes
        self._views: dict[str, StorageView] = {}
        self._classes: dict[str, type] = {}
        self._copied = 0
        self.locations: set[str] = set()

    # --- checks shared by the opcodes

    def _fail(self, what: str) -> OriginalCheckpointError:
        return OriginalCheckpointError(f"{self._source}: {what}")

    def _key(self, key, where: str):
        """A dict key or set element must be a short scalar: hashing anything else can be exponential."""
        if not isinstance(key, _SCALARS) or (isinstance(key, (str, bytes)) and len(key) > self._limits.max_name):
            raise self._fail(f"{where} {brief(key)} is not a name of at most {self._limits.max_name} characters")
        return key

    def _charge(self, n: int) -> None:
        self._copied += n
        if self._copied > self._limits.max_copied:
            raise self._fail(f"pickle copies more than {self._limits.max_copied} elements")

    def _int(self, value: int) -> int:
        if value.bit_length() > self._limits.max_int_bits and value != LEGACY_MAGIC:
            raise self._fail(f"pickled integer of {value.bit_length()} bits (at most {self._limits.max_int_bits})")
        self.append(value)
        return value

    def _text(self, value) -> None:
        if len(value) > self._limits.max_string:
            raise self._fail(f"pickled string of {len(value)} characters (at most {self._limits.max_string})")
        self.append(value)

    def _sized(self, fmt: str) -> int:
        (n,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        if n > self._limits.max_string:
            raise self._fail(f"pickled string of {n} bytes (at most {self._limits.max_string})")
        return n

    # --- numbers and strings with bounds

    def load_int(self):
        data = self.readline()[:-1]
        if len(data) > 24:
            raise self._fail(f"pickled integer of {len(data)} digits")
        self._int({b"00": False, b"01": True}.get(data) if data in (b"00", b"01") else int(data, 0))

    def load_long(self):
        data = self.readline()[:-1].rstrip(b"L")
        if len(data) > 40:
            raise self._fail(f"pickled integer of {len(data)} digits")
        self._int(int(data, 0))

    def load_long1(self):
        n = self.read(1)[0]
        if n > 16:
            raise self._fail(f"pickled integer of {n} bytes")
        self._int(pickle.decode_long(self.read(n)))

    def load_long4(self):
        (n,) = struct.unpack("<i", self.read(4))
        if not 0 <= n <= 16:
            raise self._fail(f"pickled integer of {n} bytes")
        self._int(pickle.decode_long(self.read(n)))

    def load_binunicode(self):
        self._text(str(self.read(self._sized("<I")), "utf-8", "surrogatepass"))

    def load_binbytes(self):
        self._text(self.read(self._sized("<I")))

    def load_binstring(self):
        (n,) = struct.unpack("<i", self.read(4))
        if not 0 <= n <= self._limits.max_string:
            raise self._fail(f"pickled string of {n} bytes")
        self._text(self._decode_string(self.read(n)))

    def load_string(self):
        data = self.readline()[:-1]
        if len(data) < 2 or data[0] != data[-1] or data[0] not in b"\"'":
            raise pickle.UnpicklingError("the STRING opcode argument must be quoted")
        self._text(self._decode_string(codecs.escape_decode(data[1:-1])[0]))

    def load_unicode(self):
        self._text(str(self.readline()[:-1], "raw-unicode-escape"))

    # --- containers that hash their keys

    def load_dict(self):
        items = self.pop_mark()
        self.append({self._key(items[i], "dict key"): items[i + 1] for i in range(0, len(items) - 1, 2)})

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._setitems(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._setitems(self.stack[-1], items)

    def _setitems(self, target, items: list) -> None:
        if not isinstance(target, dict):
            raise self._fail(f"SETITEM on a {type(target).__name__}, not a dict")
        for i in range(0, len(items) - 1, 2):
            target[self._key(items[i], "dict key")] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise self._fail(f"ADDITEMS on a {type(target).__name__}, not a set")
        target.update(self._key(x, "set element") for x in items)

    def load_frozenset(self):
        self.append(frozenset(self._key(x, "set element") for x in self.pop_mark()))

    # --- objects

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise self._fail("REDUCE arguments are not a tuple")
        if isinstance(func, AllowedCallable):
            self.stack[-1] = func(*args)
        elif isinstance(func, type) and issubclass(func, InertModule):
            self.stack[-1] = func(*args)
        else:
            raise self._fail(f"REDUCE calls a {type(func).__name__}, which is not an allow-listed callable")

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, InertModule)) or not isinstance(args, tuple):
            raise self._fail(f"NEWOBJ of {brief(cls)}, which is not a module class")
        self.append(cls(*args))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, InertModule):
            inst.__dict__["_avel_state"] = state
        elif isinstance(inst, (TensorRef, dict)):
            pass    # PyTorch 0.3 Parameter flags; torch's OrderedDict _metadata: not needed
        else:
            raise self._fail(f"BUILD on a {type(inst).__name__}, which takes no pickled state")

    dispatch[pickle.INT[0]] = load_int
    dispatch[pickle.LONG[0]] = load_long
    dispatch[pickle.LONG1[0]] = load_long1
    dispatch[pickle.LONG4[0]] = load_long4
    dispatch[pickle.BINUNICODE[0]] = load_binunicode
    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINSTRING[0]] = load_binstring
    dispatch[pickle.STRING[0]] = load_string
    dispatch[pickle.UNICODE[0]] = load_unicode
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build

    # --- globals

    def find_class(self, module: str, name: str):
        module = _MODULE_RENAMES.get(module, module)
        full = f"{module}.{name}"
        if len(full) > self._limits.max_name:
            raise self._fail(f"global name of {len(full)} characters")
        safe = {
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,              # PyTorch 0.3
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter,
            "torch.nn.parameter.Parameter": self._rebuild_parameter,           # PyTorch 0.3
            "torch.nn.backends.thnn._get_thnn_function_backend": self._make_none,   # 0.3 Module._backend
            "collections.OrderedDict": self._mapping(OrderedDict),
            "builtins.dict": self._mapping(dict),
            "builtins.set": self._collection(set, keyed=True),
            "builtins.frozenset": self._collection(frozenset, keyed=True),
            "builtins.list": self._collection(list, keyed=False),
            "builtins.tuple": self._collection(tuple, keyed=False),
        }
        if full in safe:
            return AllowedCallable(safe[full], full)
        if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
            return StorageType(full, STORAGE_DTYPES[name])
        if self._is_module_class(module, name):
            if full not in self._classes:
                self._classes[full] = InertType(name, (InertModule,), {"qualname": full, "__slots__": ()})
            return self._classes[full]
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load: the pickle asks for global {brief(full)}, which is not on "
            "the allow-list of an AVE checkpoint (nothing was executed)")

    def _is_module_class(self, module: str, name: str) -> bool:
        if f"{module}.{name}" in _INERT_EXTRA:
            return True
        if not name.isidentifier():
            return False
        return module in self._prefixes or module.startswith("torch.nn.modules.")

    # --- the allow-listed callables (arguments checked before anything is built)

    def _collection(self, kind: type, *, keyed: bool):
        def build(*args):
            if not args:
                return kind()
            if len(args) != 1 or not isinstance(args[0], (list, tuple)):
                raise self._fail(f"{kind.__name__}() called with {brief(args)}")
            self._charge(len(args[0]))
            return kind(self._key(x, "set element") for x in args[0]) if keyed else kind(args[0])
        return build

    def _mapping(self, kind: type):
        def build(*args):
            out = kind()
            if not args:
                return out
            if len(args) != 1 or not isinstance(args[0], (list, tuple)):
                raise self._fail(f"{kind.__name__}() called with {brief(args)}")
            self._charge(len(args[0]))
            for pair in args[0]:     # Python 2 OrderedDict: ([[key, value], ...],)
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise self._fail(f"{kind.__name__}() item {brief(pair)} is not a (key, value) pair")
                out[self._key(pair[0], "dict key")] = pair[1]
            return out
        return build

    def _rebuild_tensor(self, storage=None, offset=None, size=None, stride=None, *rest):
        if not isinstance(storage, (Storage, StorageView)):
            raise self._fail(f"tensor rebuilt from {type(storage).__name__}, not a storage")
        dims = self._limits.max_tensor_dims
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
                and len(size) == len(stride) <= dims):
            raise self._fail(f"tensor size {brief(size)} / stride {brief(stride)} are not two "
                             f"equal-length tuples of at most {dims} integers")
        bound = self._limits.max_elements
        for v in (offset, *size, *stride):
            if type(v) is not int or not 0 <= v <= bound:
                raise self._fail(f"tensor offset/size/stride {brief(v)} is not an integer in [0, {bound}]")
        return TensorRef(storage, offset, tuple(size), tuple(stride))

    def _rebuild_parameter(self, data=None, *rest):
        if not isinstance(data, TensorRef):
            raise self._fail(f"parameter rebuilt from {type(data).__name__}, not a tensor")
        return data

    @staticmethod
    def _make_none(*args):
        return None

    # --- persistent ids

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise self._fail(f"unexpected persistent id {brief(pid)}")
        tag = pid[0].decode("latin1") if isinstance(pid[0], bytes) else pid[0]
        if tag == "module":
            # ('module', class, source_file, source): the source text is ignored, never compiled.
            if len(pid) < 2 or not (isinstance(pid[1], type) and issubclass(pid[1], InertModule)):
                raise self._fail(f"bad module persistent id {brief(pid)}")
            return pid[1]
        if tag == "storage":
            return self._storage(pid)
        raise self._fail(f"unknown persistent id type {brief(tag)}")

    def _storage(self, pid: tuple):
        if len(pid) not in (5, 6):
            raise self._fail(f"bad storage persistent id of length {len(pid)}")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        lim = self._limits
        if not isinstance(storage_type, StorageType):
            raise self._fail(f"storage of unknown type {brief(storage_type)}")
        if not (isinstance(key, str) and len(key) <= lim.max_name and isinstance(location, str)
                and len(location) <= 64 and type(numel) is int and 0 <= numel <= lim.max_elements):
            raise self._fail(f"malformed storage persistent id {brief(pid)}")
        storage = self._storages.get(key)
        if storage is None:
            if len(self._storages) >= lim.max_storages:
                raise self._fail(f"more than {lim.max_storages} storages")
            storage = self._storages[key] = Storage(key, storage_type.dtype, numel, location)
            self.locations.add(location)
        elif storage.dtype != storage_type.dtype or storage.numel != numel:
            raise self._fail(f"storage {brief(key)} declared twice with different types")
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and len(view[0]) <= lim.max_name and all(type(v) is int for v in view[1:])):
            raise self._fail(f"malformed storage view {brief(view)}")
        view_key, offset, view_size = view
        if offset < 0 or view_size < 0 or offset + view_size > numel:
            raise self._fail(f"storage view {brief(view)} out of bounds")
        return self._views.setdefault(view_key, StorageView(storage, offset, view_size))


def unpickle(f, budget: int, *, source: str, storages: dict[str, Storage], module_prefixes: frozenset[str],
             limits: Limits):
    """One pickle from ``f`` (at most ``budget`` bytes) -> (object, storage locations, bytes used)."""
    reader = BoundedReader(f, budget, limits)
    up = RestrictedUnpickler(reader, source=source, storages=storages, module_prefixes=module_prefixes,
                             limits=limits)
    obj = up.load()
    check_graph(obj, source, limits)
    return obj, up.locations, budget - reader._left


def unpickle_bytes(data: bytes, **kwargs):
    return unpickle(io.BytesIO(data), len(data), **kwargs)
