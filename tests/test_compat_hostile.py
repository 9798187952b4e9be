"""Hostile checkpoints: crafted resource attacks and malicious pickles in every reference format.

Each must end in one OriginalCheckpointError naming the file, quickly and without a large
allocation, and nothing pickled may run. The resource cases run in a fresh interpreter so that the
peak memory of each is measured on its own.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict

import pytest
import torch

from avel.compat import (
    OriginalCheckpointError,
    UnsafeCheckpointError,
    load_original,
    read_original,
)

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


# ------------------------------------------------------------------------ raw pickle building


def g(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def s(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def i(value: int) -> bytes:
    if 0 <= value < 2**31:
        return pickle.BININT + struct.pack("<i", value)
    raw = pickle.encode_long(value)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def put(n: int) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", n)


def get(n: int) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", n)


def storage_pid(key: str, numel: int, *, legacy: bool, dtype: str = "FloatStorage") -> bytes:
    items = [s("storage"), g("torch", dtype), s(key), s("cpu"), i(numel)] + ([pickle.NONE] if legacy else [])
    return tup(*items) + pickle.BINPERSID


def tensor(pid: bytes, size: tuple, stride: tuple, offset: int = 0) -> bytes:
    return (g("torch._utils", "_rebuild_tensor_v2")
            + tup(pid, i(offset), tup(*map(i, size)), tup(*map(i, stride)), pickle.NEWFALSE,
                  g("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE)
            + pickle.REDUCE)


def state_dict(*items: bytes) -> bytes:
    """``items`` alternate key and value pickles."""
    return (pickle.PROTO + b"\x02" + g("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.MARK + b"".join(items) + pickle.SETITEMS + pickle.STOP)


def legacy_file(path, main: bytes, records: dict[str, bytes], counts: dict[str, int] | None = None):
    with open(path, "wb") as f:
        for head in (MAGIC, 1001, SYS_INFO):
            f.write(pickle.dumps(head, protocol=2))
        f.write(main)
        f.write(pickle.dumps(list(records), protocol=2))
        for key, raw in records.items():
            count = (counts or {}).get(key, len(raw) // 4)
            f.write(struct.pack("<q", count) + raw)
    return path


def zip_file(path, main: bytes, records: dict[str, bytes], *, compress_data=False, compress_pkl=False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", main, zipfile.ZIP_DEFLATED if compress_pkl else zipfile.ZIP_STORED)
        zf.writestr("archive/byteorder", "little")
        for key, raw in records.items():
            zf.writestr(f"archive/data/{key}", raw, zipfile.ZIP_DEFLATED if compress_data else zipfile.ZIP_STORED)
    return path


def doubling_tuple(levels: int) -> bytes:
    """t_k = (t_{k-1}, t_{k-1}) through the memo: a few bytes per level, 2**levels leaves."""
    out = pickle.EMPTY_TUPLE + put(0) + pickle.POP
    for k in range(1, levels + 1):
        out += get(k - 1) + get(k - 1) + pickle.TUPLE2 + put(k) + pickle.POP
    return out + get(levels)


def nested_lists(depth: int) -> bytes:
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


ONE = struct.pack("<f", 1.0)


# ---------------------------------------------------------------------------- the crafted cases


def crafted_cases(tmp) -> dict[str, object]:
    """name -> path of a hostile file (each under a few hundred kilobytes)."""
    c = {}
    w = tensor(storage_pid("0", 1, legacy=True), (1,), (1,))
    c["doubling_tuple_key"] = legacy_file(tmp / "dtk.pt", state_dict(doubling_tuple(50), w), {"0": ONE})
    c["doubling_tuple_set"] = legacy_file(tmp / "dts.pt", state_dict(
        s("w"), w, s("x"), g("__builtin__", "set") + tup(pickle.EMPTY_LIST + doubling_tuple(50) + pickle.APPEND)
        + pickle.REDUCE), {"0": ONE})
    c["doubling_tuple_size"] = legacy_file(tmp / "dtz.pt", state_dict(
        s("w"), g("torch._utils", "_rebuild_tensor_v2") + tup(
            storage_pid("0", 1, legacy=True), i(0), doubling_tuple(50), doubling_tuple(50)) + pickle.REDUCE),
        {"0": ONE})
    c["doubling_module_tree"] = legacy_file(tmp / "dmt.pt", _doubling_modules(40), {"0": ONE})
    c["doubling_module_tree_shallow"] = legacy_file(tmp / "dms.pt", _doubling_modules(20), {"0": ONE})
    c["stride0_1GB"] = legacy_file(tmp / "s0.pt", state_dict(
        s("w"), tensor(storage_pid("0", 1, legacy=True), (32768, 32768), (0, 0))), {"0": ONE})
    c["stride0_huge"] = legacy_file(tmp / "s0h.pt", state_dict(
        s("w"), tensor(storage_pid("0", 1, legacy=True), (2**40, 2**40), (0, 0))), {"0": ONE})
    c["overlapping_views"] = legacy_file(tmp / "ov.pt", state_dict(*[
        x for k in range(2000) for x in (s(f"w{k}"), tensor(storage_pid("0", 16384, legacy=True), (16384,), (1,)))]),
        {"0": bytes(4 * 16384)})
    c["declared_2e62_elements"] = legacy_file(tmp / "big.pt", state_dict(
        s("w"), tensor(storage_pid("0", 2**62, legacy=True), (2**31,), (1,))), {"0": ONE})
    c["declared_2e27_on_tiny_file"] = legacy_file(tmp / "big2.pt", state_dict(
        s("w"), tensor(storage_pid("0", 2**27, legacy=True), (2**27,), (1,))), {"0": ONE}, {"0": 2**27})
    c["record_count_overflow"] = legacy_file(tmp / "cnt.pt", state_dict(s("w"), w), {"0": ONE}, {"0": 2**63 - 1})
    c["stride_overflow"] = legacy_file(tmp / "so.pt", state_dict(
        s("w"), tensor(storage_pid("0", 1, legacy=True), (2, 2), (2**63 - 1, 1))), {"0": ONE})
    c["deep_nesting_100k"] = legacy_file(tmp / "deep.pt", state_dict(s("w"), nested_lists(100_000)), {})
    c["deep_nesting_zip"] = zip_file(tmp / "deepz.pt", state_dict(s("w"), nested_lists(100_000)), {})
    c["cycle"] = legacy_file(tmp / "cyc.pt", state_dict(
        s("w"), pickle.EMPTY_LIST + put(7) + get(7) + pickle.APPEND), {})
    c["long4_100k_bytes"] = legacy_file(tmp / "l4.pt", state_dict(
        s("w"), pickle.LONG4 + struct.pack("<i", 100_000) + b"\x01" * 100_000), {})
    c["int_text_5000_digits"] = legacy_file(tmp / "it.pt", state_dict(s("w"), b"I" + b"7" * 5000 + b"\n"), {})
    c["int_100_bits_as_size"] = legacy_file(tmp / "i100.pt", state_dict(
        s("w"), tensor(storage_pid("0", 1, legacy=True), (2**100,), (1,))), {"0": ONE})
    c["string_4GB_declared"] = legacy_file(tmp / "str.pt", state_dict(
        s("w"), pickle.BINUNICODE + struct.pack("<I", 2**32 - 1) + b"x"), {})
    c["frame_2e60"] = legacy_file(tmp / "fr.pt", pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 2**60), {})
    z = 64 << 20   # a compressed entry of 64 MiB of zeros (~64 KB on disk)
    c["zip_compressed_data"] = zip_file(tmp / "bomb.pt", state_dict(
        s("w"), tensor(storage_pid("0", z // 4, legacy=False), (z // 4,), (1,))), {"0": bytes(z)}, compress_data=True)
    c["zip_compressed_pickle"] = zip_file(tmp / "bombp.pt", state_dict(s("w"), pickle.NONE), {}, compress_pkl=True)
    c["zip_declared_past_file"] = zip_file(tmp / "zbig.pt", state_dict(
        s("w"), tensor(storage_pid("0", 2**27, legacy=False), (2**27,), (1,))), {"0": ONE})
    return c


def _doubling_modules(levels: int) -> bytes:
    """Module m_k whose two children are both m_{k-1}: 2**levels parameter paths from a few KB."""
    w = tensor(storage_pid("0", 1, legacy=True), (1,), (1,))
    out = pickle.PROTO + b"\x02" + g("torch.nn.modules.linear", "Linear") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
    out += pickle.EMPTY_DICT + s("_parameters") + pickle.EMPTY_DICT + s("weight") + w + pickle.SETITEM
    out += pickle.SETITEM + pickle.BUILD + put(0) + pickle.POP
    for k in range(1, levels + 1):
        cls = g("models", "att_Net") if k == levels else g("torch.nn.modules.container", "Sequential")
        out += cls + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + s("_modules") + pickle.EMPTY_DICT
        out += s("a") + get(k - 1) + pickle.SETITEM + s("b") + get(k - 1) + pickle.SETITEM
        out += pickle.SETITEM + pickle.BUILD + put(k) + pickle.POP
    return out + get(levels) + pickle.STOP


_PROBE = r"""
import json, resource, sys, time
from avel.compat import OriginalCheckpointError, load_original
report = {}
for name, path in json.loads(sys.argv[1]).items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        load_original(path)
        outcome = "loaded"
    except OriginalCheckpointError as e:
        outcome = "error" if path.rsplit("/", 1)[-1] in str(e) else "error without the file name: " + str(e)[:200]
    except BaseException as e:
        outcome = f"{type(e).__name__}: {str(e)[:200]}"
    report[name] = dict(outcome=outcome, seconds=time.perf_counter() - t,
                        grew_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def crafted_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cases = {name: str(path) for name, path in crafted_cases(tmp).items()}
    assert all(os.path.getsize(p) < 400_000 for p in cases.values())
    assert set(cases) == set(CASES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = [
    "doubling_tuple_key", "doubling_tuple_set", "doubling_tuple_size", "doubling_module_tree",
    "doubling_module_tree_shallow", "stride0_1GB",
    "stride0_huge", "overlapping_views", "declared_2e62_elements", "declared_2e27_on_tiny_file",
    "record_count_overflow", "stride_overflow", "deep_nesting_100k", "deep_nesting_zip", "cycle",
    "long4_100k_bytes", "int_text_5000_digits", "int_100_bits_as_size", "string_4GB_declared", "frame_2e60",
    "zip_compressed_data", "zip_compressed_pickle", "zip_declared_past_file"]


@pytest.mark.parametrize("case", CASES)
def test_crafted_file_fails_fast_and_small(crafted_report, case):
    r = crafted_report[case]
    assert r["outcome"] == "error", r
    assert r["seconds"] < 3.0, r
    assert r["grew_mb"] < 200, r


# ------------------------------------------------------------------ malicious reference files


def _inject(main: bytes, code: bytes) -> bytes:
    """Run ``code`` (a call then POP) first, as a malicious edit of a real pickle would."""
    assert main[:2] == pickle.PROTO + b"\x02"
    return main[:2] + code + pickle.POP + main[2:]


def _payloads(target) -> dict[str, bytes]:
    cmd = f"touch {target}"
    return {
        "os.system": g("os", "system") + tup(s(cmd)) + pickle.REDUCE,
        "posix.system": g("posix", "system") + tup(s(cmd)) + pickle.REDUCE,
        "builtins.eval": g("builtins", "eval") + tup(s(f"open({str(target)!r}, 'w')")) + pickle.REDUCE,
        "builtins.getattr": g("__builtin__", "getattr") + tup(g("os", "system"), s("__call__")) + pickle.REDUCE,
        "rebuild_tensor_on_a_string": g("torch._utils", "_rebuild_tensor_v2")
        + tup(s(cmd), i(0), tup(i(1)), tup(i(1))) + pickle.REDUCE,
        "rebuild_parameter_on_a_string": g("torch._utils", "_rebuild_parameter") + tup(s(cmd)) + pickle.REDUCE,
        "ordered_dict_of_bombs": g("collections", "OrderedDict")
        + tup(pickle.EMPTY_LIST + tup(doubling_tuple(40), pickle.NONE) + pickle.APPEND) + pickle.REDUCE,
        "set_of_bombs": g("__builtin__", "set") + tup(pickle.EMPTY_LIST + doubling_tuple(40) + pickle.APPEND)
        + pickle.REDUCE,
        "storage_type_called": g("torch", "FloatStorage") + tup(s(cmd)) + pickle.REDUCE,
        "build_on_a_callable": g("torch._utils", "_rebuild_tensor_v2") + pickle.EMPTY_DICT + s("fn")
        + g("os", "system") + pickle.SETITEM + pickle.BUILD,
    }


def _split_legacy(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header pickles, main pickle, rest) of a legacy stream."""
    f = io.BytesIO(raw)
    for _ in range(3):
        pickle.load(f)
    start = f.tell()
    _skip_pickle(f)
    return raw[:start], raw[start:f.tell()], raw[f.tell():]


def _skip_pickle(f) -> None:
    for op, _, _ in pickletools.genops(f):
        if op.name == "STOP":
            return


def _dp_state_dict():
    return OrderedDict([("module.fa.0.weight", torch.randn(4, 3, dtype=torch.float64)),
                        ("module.fa.0.bias", torch.zeros(4, dtype=torch.float64))])


def _malicious_files(followups, tmp, target) -> list:
    files = []
    psp_raw = (followups / "psp" / "PSP_fully_whole_legacy_cuda.pt").read_bytes()
    head, main, rest = _split_legacy(psp_raw)
    legacy = tmp / "dp_legacy.pth.tar"
    torch.save(_dp_state_dict(), legacy, _use_new_zipfile_serialization=False)
    l_head, l_main, l_rest = _split_legacy(legacy.read_bytes())
    zpath = tmp / "dp_zip.pth.tar"
    torch.save(_dp_state_dict(), zpath)
    with zipfile.ZipFile(zpath) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    for name, code in _payloads(target).items():
        p = tmp / f"PSP_1_fully_{name}.pt"
        p.write_bytes(head + _inject(main, code) + rest)
        files.append(p)
        p = tmp / f"model_epoch_1_top1_0.000_task_Supervised_{name}_legacy.pth.tar"
        p.write_bytes(l_head + _inject(l_main, code) + l_rest)
        files.append(p)
        p = tmp / f"model_seed_0_epoch_1_top1_0.000_task_FullySupervised_{name}_zip.pth.tar"
        with zipfile.ZipFile(p, "w") as zf:
            for n, data in members.items():
                zf.writestr(n, _inject(data, code) if n == pkl else data)
        files.append(p)
    return files


def test_malicious_reference_files_refused(followups, tmp_path):
    target = tmp_path / "pwned"
    files = _malicious_files(followups, tmp_path, target)
    assert len(files) == 3 * len(_payloads(target))
    for path in files:
        for loader in (read_original, load_original):
            t = time.perf_counter()
            with pytest.raises(OriginalCheckpointError) as info:
                loader(path)
            assert time.perf_counter() - t < 3.0
            assert path.name in str(info.value) and len(str(info.value)) < 2000
        if any(k in path.name for k in ("system", "eval", "getattr")):
            assert isinstance(info.value, UnsafeCheckpointError)
        assert not target.exists() and not os.path.exists("pwned")


def test_real_torch_would_run_the_payload(followups, tmp_path):
    """The injection is live: the file runs its code under torch.load(weights_only=False)."""
    target = tmp_path / "pwned"
    path = next(p for p in _malicious_files(followups, tmp_path, target) if "os.system" in p.name
                and p.name.endswith("_legacy.pth.tar"))
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass
    assert target.exists()


def wrong_shape_2018(fixtures_dir, tmp):
    """The official A+V-att state dict with ``L1.weight`` of the wrong width (an av_att file)."""
    sd = read_original(fixtures_dir / "original" / "AV_att_state_dict.pt").state_dict
    sd["L1.weight"] = torch.zeros(sd["L1.weight"].shape[0], 100)
    path = tmp / "wrong_shape.pt"
    torch.save(sd, path)
    return path


def test_wrong_parameter_shape_2018(fixtures_dir, tmp_path):
    path = wrong_shape_2018(fixtures_dir, tmp_path)
    with pytest.raises(OriginalCheckpointError, match=r"wrong_shape\.pt.*head\.L1\.weight"):
        load_original(path, kind="av_att")
