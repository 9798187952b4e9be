"""Fuzzing the checkpoint readers: mutated and random files give a model or one OriginalCheckpointError.

Seeds are small valid files in every format the readers accept (zip and legacy state dicts of a
DataParallel wrapper, a whole-module legacy pickle). Mutations: bit flips, truncation, overwritten
byte runs, and mutations of the pickle inside a zip (the archive rebuilt so its CRCs stay valid);
plus random opcode streams. Examples are derandomized so failures reproduce.
"""
from __future__ import annotations

import io
import pickle
import time
import zipfile
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avel.compat import OriginalCheckpointError, load_original, read_original

FUZZ = settings(max_examples=300, deadline=3000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _seed_state_dict():
    g = torch.Generator().manual_seed(0)
    return OrderedDict([("module.fc.weight", torch.randn(3, 2, generator=g, dtype=torch.float64)),
                        ("module.fc.bias", torch.zeros(3, dtype=torch.float64)),
                        ("module.steps", torch.tensor([4], dtype=torch.int64))])


def _bytes(save) -> bytes:
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


SEEDS = {
    "zip": _bytes(lambda f: torch.save(_seed_state_dict(), f)),
    "legacy": _bytes(lambda f: torch.save(_seed_state_dict(), f, _use_new_zipfile_serialization=False)),
}


def _whole_module_seed() -> bytes:
    # A module tree like the PSP release files (stand-in classes, cuda-free), written by torch itself.
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LSTM(3, 2, batch_first=True, bidirectional=True))
    return _bytes(lambda f: torch.save(net, f, _use_new_zipfile_serialization=False))


SEEDS["module"] = _whole_module_seed()


def _zip_with_pickle(raw_zip: bytes, new_pickle: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(raw_zip))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name in src.namelist():
            zf.writestr(name, new_pickle if name.endswith("/data.pkl") else src.read(name))
    return out.getvalue()


def _data_pkl(raw_zip: bytes) -> bytes:
    zf = zipfile.ZipFile(io.BytesIO(raw_zip))
    return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            break
        pos %= len(out)
        if kind == "flip":
            out[pos] ^= 1 << (value % 8)
        elif kind == "set":
            out[pos] = value % 256
        elif kind == "cut":
            del out[pos:]
        else:   # "dup": repeat a run of bytes (stretches containers and memo references)
            out[pos:pos] = out[pos:pos + value % 64]
    return bytes(out)


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "dup"]), st.integers(0, 2**31),
                           st.integers(0, 2**16)), min_size=1, max_size=6)


def _check(path) -> None:
    t = time.perf_counter()
    for loader in (read_original, load_original):
        try:
            loader(path)
        except OriginalCheckpointError as e:
            assert path.name in str(e) and len(str(e)) < 3000
    assert time.perf_counter() - t < 5.0


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_seeds_are_valid(seed, tmp_path):
    path = tmp_path / f"{seed}.pt"
    path.write_bytes(SEEDS[seed])
    ckpt = read_original(path) if seed != "module" else None
    if ckpt is not None:
        assert list(ckpt.state_dict) == list(_seed_state_dict())


@pytest.mark.parametrize("seed", sorted(SEEDS))
@FUZZ
@given(edits=EDITS)
def test_mutated_file(seed, edits, tmp_path):
    path = tmp_path / f"mutated_{seed}.pt"
    path.write_bytes(_mutate(SEEDS[seed], edits))
    _check(path)


@FUZZ
@given(edits=EDITS)
def test_mutated_zip_pickle(edits, tmp_path):
    path = tmp_path / "mutated_pickle.pth.tar"
    path.write_bytes(_zip_with_pickle(SEEDS["zip"], _mutate(_data_pkl(SEEDS["zip"]), edits)))
    _check(path)


# Opcodes with their argument bytes drawn too: random but mostly well-formed pickles.
_OPS = [pickle.MARK, pickle.TUPLE, pickle.TUPLE2, pickle.EMPTY_TUPLE, pickle.EMPTY_LIST, pickle.APPEND,
        pickle.APPENDS, pickle.EMPTY_DICT, pickle.SETITEM, pickle.SETITEMS, pickle.DICT, pickle.NONE,
        pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ, pickle.BINPERSID, pickle.POP, pickle.DUP, pickle.NEWTRUE,
        pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.STOP]
_ARG_OPS = [pickle.BININT1, pickle.BINGET, pickle.BINPUT, pickle.SHORT_BINUNICODE, pickle.LONG1]
_GLOBALS = [b"collections\nOrderedDict\n", b"torch._utils\n_rebuild_tensor_v2\n", b"torch\nFloatStorage\n",
            b"torch\nDoubleStorage\n", b"__builtin__\nset\n", b"torch.nn.modules.linear\nLinear\n",
            b"torch._utils\n_rebuild_parameter\n", b"models\natt_Net\n", b"os\nsystem\n"]
_TOKEN = st.one_of(
    st.sampled_from(_OPS),
    st.builds(lambda op, n: op + bytes([n]), st.sampled_from(_ARG_OPS[:3]), st.integers(0, 255)),
    st.builds(lambda text: pickle.SHORT_BINUNICODE + bytes([len(text)]) + text,
              st.sampled_from([b"storage", b"cpu", b"0", b"1", b"w", b"module.w", b"_parameters", b"_modules"])),
    st.builds(lambda n: pickle.LONG1 + bytes([n % 17]) + bytes(n % 17), st.integers(0, 255)),
    st.builds(lambda name: pickle.GLOBAL + name, st.sampled_from(_GLOBALS)),
)


@FUZZ
@given(tokens=st.lists(_TOKEN, max_size=80), wrap=st.sampled_from(["zip", "legacy"]))
def test_random_pickle(tokens, wrap, tmp_path):
    main = pickle.PROTO + b"\x02" + b"".join(tokens) + pickle.STOP
    path = tmp_path / f"random_{wrap}.pt"
    if wrap == "zip":
        path.write_bytes(_zip_with_pickle(SEEDS["zip"], main))
    else:
        head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
        path.write_bytes(head + main + pickle.dumps([], protocol=2))
    _check(path)
