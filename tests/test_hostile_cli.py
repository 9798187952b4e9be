"""Hostile and broken input through the command line (issue 13), end to end.

Every case runs ``python -m avel ...`` in a fresh process and must end in one line on stderr,
``avel COMMAND: error: ...`` naming the offending file (and field where there is one), or in the
command's documented failure summary (``avel data check``: exit 1 and the problems on stdout); with a
non-zero exit code, no traceback, in under 10 s and under 1 GB of peak memory, without running any
code from the file and without writing or changing anything it should not.

The crafted inputs come from the reader tests (tests/test_compat_hostile.py, tests/test_checkpoint.py,
tests/test_datasets.py): one source for each kind of breakage. ``benchmarks/bad_input.py`` runs the
same CASES and prints the table of the README.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:              # when imported by benchmarks/bad_input.py
    sys.path.insert(0, str(TESTS))

from _coredata import TINY_MODEL, synth, write_h5  # noqa: E402

MAX_SECONDS = 10.0                                  # CPU seconds of the child (user + system)
MAX_WALL = 30.0                                     # wall seconds: a hang guard with room for a busy machine
MAX_MB = 1024.0
DATA = dict(videos=12, background_videos=0)          # tiny synthetic folders (16-d, 3x3 grid, 3 classes)
TRAIN_QUICK = ["--epochs", "1", "--batch-size", "8", "--no-progress",      # one thread: OMP_NUM_THREADS=1
               *[x for k, v in TINY_MODEL.items() for x in ("--set", f"model_kwargs.{k}={v}")]]


# ------------------------------------------------------------------------------ what a case is


@dataclass
class Setup:
    """One prepared command: what to run and what its failure must look like."""

    argv: list[str]
    names: tuple[str, ...]                          # strings the message must contain (file, field)
    unchanged: tuple[Path, ...] = ()                # files/folders whose content must stay as it was
    absent: tuple[Path, ...] = ()                   # paths that must not exist afterwards
    summary: bool = False                           # `data check`: exit 1 and a problems report on stdout
    lock: Path | None = None                        # a folder this process holds with FolderLock meanwhile
    skip: str = ""                                  # why this case cannot run here


@dataclass(frozen=True)
class Case:
    id: str
    klass: str                                      # the input class, as the README table names it
    build: Callable[[Context, Path], Setup]


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float                                  # wall
    cpu_seconds: float                              # the child's user + system time
    peak_mb: float
    before: dict = field(default_factory=dict)      # path -> snapshot before the run
    after: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        """The failure as a user reads it: the stderr line, or the first problem of a report."""
        if self.stderr.strip():
            return self.stderr.strip().splitlines()[-1]
        problems = [ln.strip()[2:] for ln in self.stdout.splitlines() if ln.strip().startswith("- ")]
        return problems[0] if problems else self.stdout.strip()[-200:]


class Context:
    """The shared material of the cases, built once and on demand (good data, a good run, crafted files)."""

    def __init__(self, root: Path, fixtures: Path):
        self.root = Path(root)
        self.fixtures = Path(fixtures)
        self._memo: dict[str, object] = {}

    def _once(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def data(self) -> Path:
        """A good tiny AVE folder, shared by the cases that only read it."""
        return self._once("data", lambda: synth(self.root / "good-data", **DATA))

    def fresh_data(self, where: Path) -> Path:
        """A private copy of the good folder, to break."""
        return Path(shutil.copytree(self.data(), where / "ave"))

    def run(self) -> Path:
        """A good run folder (one epoch of a tiny A+V-att on ``data()``): the checkpoint to break."""
        def make():
            from dataclasses import replace

            from avel.engine.train import train

            from _coredata import quick_config

            out = self.root / "good-run"
            train(replace(quick_config(self.data(), epochs=1), threads=1), out, progress=False)
            return out
        return self._once("run", make)

    def crafted(self) -> dict[str, Path]:
        from test_compat_hostile import crafted_cases

        return self._once("crafted", lambda: crafted_cases(_mkdir(self.root / "crafted")))

    def payload(self, target: Path) -> Path:
        """A real reference checkpoint with an os.system call injected in its pickle."""
        from test_compat_hostile import _malicious_files

        files = _malicious_files(self.fixtures / "followups", _mkdir(self.root / "payload"), target)
        return next(p for p in files if p.name.startswith("PSP_") and "_os.system" in p.name)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------------ the cases


def _convert_crafted(name: str) -> Callable:
    def build(ctx: Context, tmp: Path) -> Setup:
        src = ctx.crafted()[name]
        dst = tmp / "converted"
        return Setup(["convert-original", src, dst], (src.name,), unchanged=(src,), absent=(dst,))
    return build


def _convert_wrong_shape(ctx, tmp):
    from test_compat_hostile import wrong_shape_2018

    src, dst = wrong_shape_2018(ctx.fixtures, tmp), tmp / "converted"
    return Setup(["convert-original", src, dst, "--kind", "av_att"], (src.name, "L1.weight"), absent=(dst,))


def _convert_dst_file(ctx, tmp):
    src = ctx.fixtures / "original" / "AV_att_whole_legacy.pt"
    dst = tmp / "taken.txt"
    dst.write_text("someone's file\n")
    return Setup(["convert-original", src, dst], (dst.name, "file"), unchanged=(dst,))


def _convert_payload(ctx, tmp):
    target = tmp / "pwned"
    src, dst = ctx.payload(target), tmp / "converted"
    return Setup(["convert-original", src, dst], (src.name,), absent=(target, dst, tmp / "pwned"))


def _broken_checkpoint(case: str) -> Callable:
    def build(ctx: Context, tmp: Path) -> Setup:
        from test_checkpoint import _copy, break_checkpoint

        folder = break_checkpoint(_copy(ctx.run(), tmp / "ckpt"), case)
        preds = tmp / "preds.npz"
        field_ = {"unknown_kwarg": "bogus", "huge_hidden": "hidden", "no_model": "model"}.get(case)
        return Setup(["evaluate", "--checkpoint", folder, "--data-root", ctx.data(), "--predictions", preds],
                     (str(folder),) + ((field_,) if field_ else ()), unchanged=(folder,), absent=(preds,))
    return build


def _broken_data(breakage: str, command: str) -> Callable:
    """One breakage of tests/test_datasets.py (or NaN features), met by `train`, `evaluate` or `data check`."""
    def build(ctx: Context, tmp: Path) -> Setup:
        root = ctx.fresh_data(tmp)
        if breakage == "nan":
            with h5py.File(root / "audio_feature.h5", "r") as f:
                audio = f["avadataset"][()]
            audio[3, 4, :] = np.nan
            write_h5(root / "audio_feature.h5", audio)
            # training stops at the non-finite loss and names the file and row; data check names the file
            culprit = ("audio_feature.h5", "row 3") if command == "train" else ("audio_feature.h5",)
        else:
            from test_datasets import break_data_folder

            break_data_folder(root, breakage)
            culprit = ({"spec_not_json": "features.json", "float_order": "train_order.h5",
                        "huge": "visual_feature.h5"}.get(breakage, "audio_feature.h5"),)
        names = culprit
        if command == "check":
            return Setup(["data", "check", root], names, unchanged=(root,), summary=True)
        if command == "evaluate":
            preds = tmp / "preds.npz"
            return Setup(["evaluate", "--checkpoint", ctx.run(), "--data-root", root, "--split",
                          "train" if breakage == "float_order" else "test", "--predictions", preds],
                         names, unchanged=(root, ctx.run()), absent=(preds,))
        out = tmp / "run"    # refused data: nothing but the run lock; diverged: no checkpoint, no last/
        written = (out / "model.safetensors", out / "last") + ((out / "run.yaml",) if breakage != "nan" else ())
        return Setup(["train", "--data-root", root, "--out", out, *TRAIN_QUICK], names, unchanged=(root,),
                     absent=written)
    return build


def _train(*extra: str, names: tuple[str, ...], config: str | None = None, out_file: bool = False,
           hold: bool = False, cuda: bool = False) -> Callable:
    """`avel train` on the good folder with ``extra`` options; the run folder must stay unwritten."""
    def build(ctx: Context, tmp: Path) -> Setup:
        if cuda:
            import torch

            if torch.cuda.is_available():
                return Setup([], (), skip="this machine has CUDA")
        out = tmp / "run"
        argv = ["train", "--data-root", ctx.data(), "--out", out, *TRAIN_QUICK, *extra]
        unchanged, absent, lock = (), (out,), None
        if config is not None:
            cfg = tmp / "run.yaml"
            cfg.write_text(config)
            argv = ["train", "--data-root", ctx.data(), "--out", out, "--config", cfg, "--no-progress"]
            unchanged = (cfg,)
        if out_file:
            out.write_text("not a folder\n")
            unchanged, absent = (out,), ()
        if hold:
            out.mkdir()
            lock, unchanged, absent = out, (), (out / "model.safetensors", out / "metrics.jsonl", out / "run.yaml")
        return Setup(argv, tuple(str(out) if n == "OUT" else n for n in names), unchanged=unchanged,
                     absent=absent, lock=lock)
    return build


def _synth_zero(ctx, tmp):
    out = tmp / "synth"
    return Setup(["data", "synth", out, "--videos", "0"], ("videos",), absent=(out,))


def _evaluate_batch_zero(ctx, tmp):
    preds = tmp / "preds.npz"
    return Setup(["evaluate", "--checkpoint", ctx.run(), "--data-root", ctx.data(), "--batch-size", "0",
                  "--predictions", preds], ("batch",), absent=(preds,))


_CRAFTED = [("doubling_tuple_key", "memo-doubling tuple as a key"), ("stride0_1GB", "stride-0 tensor (1 GB view)"),
            ("zip_compressed_data", "zip with a deflated 64 MiB entry"), ("deep_nesting_100k", "nesting 100,000 deep"),
            ("int_text_5000_digits", "5,000-digit integer")]
_CKPT = [("wrong_shape", "tensor of the wrong shape"), ("missing", "missing tensor"),
         ("lying_header", "safetensors header claiming 1 TB"), ("truncated", "truncated model.safetensors"),
         ("old_layout_not_json", "old layout, config.json not JSON"), ("list", "config.json a list"),
         ("no_model", "config without `model`"), ("unknown_kwarg", "unknown constructor argument"),
         ("huge_hidden", "hidden size 10^7")]
_DATA = [("group", "a group where a dataset should be"), ("scalar", "scalar dataset"), ("string", "string dataset"),
         ("complex", "complex features"), ("float_order", "float order indices"),
         ("spec_not_json", "features.json not JSON"), ("2d_audio", "2-D audio features"),
         ("huge", "10 KB h5 declaring 73 GiB"), ("nan", "NaN features")]

CASES: list[Case] = [
    *[Case(f"convert-{n}", f"official checkpoint: {k}", _convert_crafted(n)) for n, k in _CRAFTED],
    Case("convert-wrong_shape", "official checkpoint: wrong parameter shape", _convert_wrong_shape),
    Case("convert-dst_is_file", "official checkpoint: destination is a file", _convert_dst_file),
    Case("convert-os_system", "official checkpoint: os.system payload", _convert_payload),
    *[Case(f"ckpt-{n}", f"avel checkpoint: {k}", _broken_checkpoint(n)) for n, k in _CKPT],
    *[Case(f"train-data-{n}", f"data folder (train): {k}", _broken_data(n, "train")) for n, k in _DATA],
    *[Case(f"evaluate-data-{n}", f"data folder (evaluate): {k}", _broken_data(n, "evaluate"))
      for n, k in _DATA if n in ("group", "huge")],
    *[Case(f"check-data-{n}", f"data folder (data check): {k}", _broken_data(n, "check"))
      for n, k in _DATA if n in ("2d_audio", "spec_not_json", "nan")],
    Case("train-set-unknown_model_arg", "CLI: --set model_kwargs.bogus=1",
         _train("--set", "model_kwargs.bogus=1", names=("bogus",))),
    Case("train-set-threads_negative", "CLI: --set threads=-3", _train("--set", "threads=-3", names=("threads",))),
    Case("train-set-eval_every_zero", "CLI: --set eval_every=0", _train("--set", "eval_every=0", names=("eval_every",))),
    Case("train-set-bool_no_way", "CLI: --set shuffle=no_way", _train("--set", "shuffle=no_way", names=("shuffle",))),
    Case("train-epochs_zero", "CLI: --epochs 0", _train("--epochs", "0", names=("epochs",))),
    Case("train-epochs_negative", "CLI: --epochs -2", _train("--epochs", "-2", names=("epochs",))),
    Case("train-out_is_file", "CLI: --out an existing file", _train(names=("OUT",), out_file=True)),
    Case("train-config_not_yaml", "CLI: --config not YAML", _train(names=("run.yaml",), config="model: [av_att\n")),
    Case("train-config_yaml_list", "CLI: --config a YAML list", _train(names=("run.yaml",), config="- 1\n- 2\n")),
    Case("train-device_bogus", "CLI: --device bogus", _train("--device", "bogus", names=("bogus",))),
    Case("train-device_cuda", "CLI: --device cuda without CUDA", _train("--device", "cuda", names=("cuda",),
                                                                        cuda=True)),
    Case("train-out_locked", "CLI: --out held by a live run", _train(names=("OUT", "pid"), hold=True)),
    Case("synth-videos_zero", "CLI: data synth --videos 0", _synth_zero),
    Case("evaluate-batch_size_zero", "CLI: evaluate --batch-size 0", _evaluate_batch_zero),
]


# ----------------------------------------------------------------------------------- running them


def snapshot(path: Path) -> dict:
    """{relative name: (size, sha1)} of a file or a folder's files; {} when absent."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {str(p.relative_to(path)) if p != path else ".": (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in files}


# The child is started by a small launcher so that its peak memory is its own: a process forked from
# this (large) pytest process would count the parent's pages in its ru_maxrss until it execs.
LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_maxrss} {r.ru_utime + r.ru_stime}")
sys.exit(code)
"""


def run_cli(argv: list, cwd: Path, timeout: float = 120.0) -> tuple[int, str, str, float, float, float]:
    """``python -m avel ARGV`` in a fresh process: (exit code, stdout, stderr, wall s, CPU s, peak MB of the child)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    out, err, usage = cwd / ".stdout", cwd / ".stderr", cwd / ".usage"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage), sys.executable, "-m", "avel",
                                 *map(str, argv)], stdout=fo, stderr=fe, env=env, cwd=cwd, start_new_session=True)
        killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
        killer.start()
        try:
            proc.wait()
        finally:
            killer.cancel()
        seconds = time.perf_counter() - t0
    text = [p.read_text(errors="replace") for p in (out, err)]
    maxrss, cpu = (float(x) for x in usage.read_text().split()) if usage.is_file() else (float("inf"), seconds)
    for p in (out, err, usage):
        p.unlink(missing_ok=True)
    return proc.returncode, text[0], text[1], seconds, cpu, maxrss / 1024     # ru_maxrss: KiB on Linux


def run_case(case: Case, ctx: Context, setup: Setup, cwd: Path) -> Outcome:
    watched = setup.unchanged
    before = {str(p): snapshot(p) for p in watched}
    with contextlib.ExitStack() as stack:
        if setup.lock is not None:
            from avel.io import FolderLock

            stack.enter_context(FolderLock(setup.lock))
        rc, out, err, seconds, cpu, peak = run_cli(setup.argv, cwd)
    after = {str(p): snapshot(p) for p in watched}
    return Outcome(rc, out, err, seconds, cpu, peak, before, after)


def prepare(cases: list[Case], ctx: Context, root: Path) -> dict[str, tuple[Setup, Path]]:
    """Build every case's files (in this process, one after the other)."""
    prepared = {}
    for case in cases:
        cwd = _mkdir(root / case.id)
        prepared[case.id] = (case.build(ctx, cwd), cwd)
    return prepared


def run_cases(cases: list[Case], ctx: Context, root: Path, jobs: int = 2) -> dict[str, tuple[Setup, Outcome | None]]:
    """Prepare then run ``cases`` (``jobs`` children at a time; each child's memory is measured on its own)."""
    prepared = prepare(cases, ctx, root)

    def one(case: Case):
        setup, cwd = prepared[case.id]
        return case.id, (setup, None if setup.skip else run_case(case, ctx, setup, cwd))

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return dict(pool.map(one, cases))


def problems(setup: Setup, outcome: Outcome) -> list[str]:
    """What is wrong with how the command ended (empty: it ended as the issue asks)."""
    bad = []
    text = outcome.stdout + outcome.stderr
    if outcome.rc == 0:
        bad.append("exit code 0")
    if "Traceback" in text:
        bad.append("a traceback")
    if setup.summary:
        if outcome.rc != 1 or "problems (" not in outcome.stdout:
            bad.append(f"not the data check failure summary (exit {outcome.rc})")
        if outcome.stderr.strip():
            bad.append(f"stderr is not empty: {outcome.stderr[-300:]!r}")
    else:
        lines = outcome.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("avel ") or "error:" not in lines[0]:
            bad.append(f"stderr is not one `avel COMMAND: error: ...` line: {outcome.stderr[-600:]!r}")
    if setup.summary:      # some problem of the report names the file
        report = [ln for ln in outcome.stdout.splitlines() if ln.strip().startswith("- ")]
        message = next((ln for ln in report if all(n in ln for n in setup.names)), outcome.message)
    else:
        message = outcome.stderr
    missing = [n for n in setup.names if n not in message]
    if missing:
        bad.append(f"the message does not name {missing}: {message[-400:]!r}")
    if outcome.cpu_seconds >= MAX_SECONDS or outcome.seconds >= MAX_WALL:
        bad.append(f"took {outcome.cpu_seconds:.1f} s of CPU, {outcome.seconds:.1f} s of wall time")
    if outcome.peak_mb >= MAX_MB:
        bad.append(f"peak memory {outcome.peak_mb:.0f} MB")
    changed = [p for p in outcome.before if outcome.before[p] != outcome.after[p]]
    if changed:
        bad.append(f"changed: {changed}")
    present = [str(p) for p in setup.absent if Path(p).exists()]
    if present:
        bad.append(f"written: {present}")
    return bad


# ------------------------------------------------------------------------------------- the tests

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, fixtures_dir):
    """Every selected case, run once (two at a time: the cases wait on process start, not on a core)."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    cases = [c for c in CASES if c.id in selected]
    root = tmp_path_factory.mktemp("hostile-cli")
    return run_cases(cases, Context(root / "ctx", fixtures_dir), root / "cases",
                     jobs=int(os.environ.get("AVEL_HOSTILE_JOBS", "2")))


@pytest.mark.parametrize("case", [c.id for c in CASES])
def test_bad_input_ends_in_one_clear_line(outcomes, case):
    setup, outcome = outcomes[case]
    if setup.skip:
        pytest.skip(setup.skip)
    assert not problems(setup, outcome), (problems(setup, outcome), outcome.stderr[-3000:], outcome.stdout[-1000:])


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
