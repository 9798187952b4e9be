"""The plain objects a restricted unpickle produces, and the check of the object graph they form.

Nothing here can be made to run code: the stand-ins refuse attribute writes from a pickle (BUILD),
storages and tensors are inert records, and the graph check is iterative and linear in size.
"""
from __future__ import annotations

import torch

from .limits import Limits, OriginalCheckpointError

# --------------------------------------------------------------------------- inert pickle objects


class _Frozen:
    """Base for allow-listed objects: pickle's BUILD cannot set attributes on them."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def _init(self, **values):
        for k, v in values.items():
            object.__setattr__(self, k, v)


class StorageType(_Frozen):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self._init(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return self.name


class Storage(_Frozen):
    """A storage named in a persistent id; its bytes are read after unpickling."""

    __slots__ = ("key", "dtype", "numel", "location")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str):
        self._init(key=key, dtype=dtype, numel=numel, location=location)


class StorageView(_Frozen):
    """A slice of a storage (legacy ``view_metadata``)."""

    __slots__ = ("root", "offset", "numel")

    def __init__(self, root: Storage, offset: int, numel: int):
        self._init(root=root, offset=offset, numel=numel)


class TensorRef(_Frozen):
    """A tensor to build once the storage bytes are known (size/stride already checked)."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset: int, size: tuple, stride: tuple):
        self._init(storage=storage, offset=offset, size=size, stride=stride)


class InertType(type):
    """Metaclass of the stand-ins: their class attributes cannot be changed from a pickle."""

    def __setattr__(cls, name, value):
        raise AttributeError(f"stand-in class {cls.__name__} is read-only")


class InertModule(metaclass=InertType):
    """Stand-in for a pickled module class: records the pickled state and does nothing else."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_avel_args"] = args

    def __setattr__(self, name, value):
        raise AttributeError(f"stand-in {self.qualname} is read-only")

    @property
    def state(self) -> dict:
        state = self.__dict__.get("_avel_state")
        if isinstance(state, tuple) and len(state) == 2:   # (dict state, slot state)
            merged: dict = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        return state if isinstance(state, dict) else {}


class AllowedCallable(_Frozen):
    """An allow-listed callable implemented here (never the torch function of that name)."""

    __slots__ = ("fn", "name")

    def __init__(self, fn, name: str):
        self._init(fn=fn, name=name)

    def __call__(self, *args):
        return self.fn(*args)


# ----------------------------------------------------------------------------- graph checks


def _children(obj):
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    if isinstance(obj, dict):
        return obj.values()       # keys are scalars (checked when inserted)
    if isinstance(obj, InertModule):
        return (obj.__dict__.get("_avel_state"), obj.__dict__.get("_avel_args"))
    return ()


def check_graph(root, source: str, limits: Limits) -> None:
    """Refuse cycles and nesting deeper than ``limits.max_depth``; linear in the graph's size."""
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, iter(_children(root)))]
    on_path.add(id(root))
    while stack:
        obj, it = stack[-1]
        child = next(it, _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(obj))
            d = 1 + max((depth.get(id(c), 0) for c in _children(obj)), default=0)
            depth[id(obj)] = d
            if d > limits.max_depth:
                raise OriginalCheckpointError(f"{source}: pickled object nested deeper than {limits.max_depth}")
            continue
        if not _children(child) or id(child) in depth:
            continue
        if id(child) in on_path:
            raise OriginalCheckpointError(f"{source}: pickled object contains a cycle")
        if len(stack) > limits.max_depth:
            raise OriginalCheckpointError(f"{source}: pickled object nested deeper than {limits.max_depth}")
        on_path.add(id(child))
        stack.append((child, iter(_children(child))))


_END = object()
