"""Errors, resource limits and bounded reprs shared by the checkpoint readers.

The limits come from what an AVE model file can be: the largest reference checkpoint (CMRAN) holds
174 tensors and 15.9 M values (127 MB as float64); its pickle is a few tens of kilobytes. Every
limit below leaves a wide margin over that and is checked before the thing it bounds is allocated,
hashed or printed, so a hostile file fails fast with one :class:`OriginalCheckpointError`.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass

from ..data.errors import DataError


class OriginalCheckpointError(DataError):
    """An official checkpoint that cannot be read or does not fit the model; names the file."""


class UnsafeCheckpointError(OriginalCheckpointError):
    """The pickle asks for a global outside the allow-list; nothing was executed."""


@dataclass(frozen=True)
class Limits:
    max_elements: int = 2**28          # values in all storages of one file (16x the largest model)
    max_tensor_dims: int = 8           # an AVE parameter has at most 2 dimensions (cuDNN views 3)
    max_storages: int = 20_000         # storages / tensors per file (largest model: 220)
    max_pickle_bytes: int = 4 << 20    # bytes of pickle per file (largest: 16 KB; pure-Python unpickling)
    max_depth: int = 100               # nesting of containers and modules in the pickled object
    max_name: int = 1_000              # characters of a key, parameter name or dotted module path
    max_string: int = 1 << 20          # characters of any pickled string (0.3 files carry class source)
    max_line: int = 4_096              # bytes of one text-opcode line (GLOBAL, INT, ...)
    max_int_bits: int = 64             # pickled integers: sizes, offsets, the 80-bit magic is special
    max_copied: int = 1_000_000        # elements copied by the allow-listed constructors (set, list, ...)
    max_modules: int = 10_000          # module objects visited when flattening a whole-module pickle
    max_zip_entries: int = 50_000      # members of a zip checkpoint


DEFAULT_LIMITS = Limits()

# The legacy magic number has 80 bits: the one integer allowed beyond max_int_bits.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = 60
_REPR.maxlong = 40
_REPR.maxother = 60


def brief(obj, limit: int = 120) -> str:
    """A repr of ``obj`` whose cost and length are bounded however large or deep ``obj`` is."""
    if isinstance(obj, int) and not isinstance(obj, bool) and obj.bit_length() > 128:
        return f"<int of {obj.bit_length()} bits>"
    try:
        text = _REPR.repr(obj)
    except Exception as e:   # a stand-in without a usable repr: say what it is
        text = f"<{type(obj).__name__}: repr failed ({type(e).__name__})>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
