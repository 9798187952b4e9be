"""Data-parallel training under torchrun (gloo, CPU) gives the one-process run.

Two local processes (``python -m torch.distributed.run --nproc-per-node 2 -m avel train``) and one
process train the same config on a tiny synthetic folder. Each rank takes its slice of every
global batch and the loss is scaled so the summed gradients are the one-process ones: the
per-epoch train loss must agree to float rounding, and so must the weights. The batch size
leaves a last global batch of one video, so one rank has no rows in that step and must still
take part in the gradient all-reduce. Only rank 0 evaluates and writes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avel.data.synth import SynthConfig, generate

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# 40 videos -> 32 training rows; batch 31 -> global batches of 31 and 1 (the 1 leaves rank 1 empty),
# batch 6 -> five batches of 6 and one of 2.
EPOCHS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _train_args(root: Path, out: Path, batch: int, optim: str) -> list[str]:
    return ["-m", "avel", "train", "--data-root", str(root), "--model", "av_att", "--epochs", str(EPOCHS),
            "--batch-size", str(batch), "--out", str(out), "--no-progress",
            "--set", "threads=1", "--set", "eval_every=1", "--set", "shuffle=true", "--set", f"optim.name={optim}",
            "--set", "model_kwargs.hidden=8", "--set", "model_kwargs.att_hidden=8",
            "--set", "model_kwargs.head_hidden=8"]


def _run(args: list[str], world: int, cwd: Path) -> None:
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("dist") / "ave",
                    SynthConfig(videos=40, classes=3, visual_dim=16, audio_dim=16, background_videos=0, seed=0))


@pytest.mark.parametrize("batch,optim", [(31, "adam"), (6, "sgd")])
def test_two_processes_match_one(root: Path, tmp_path: Path, batch: int, optim: str):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train_args(root, one, batch, optim), 1, tmp_path)
    _run(_train_args(root, two, batch, optim), 2, tmp_path)

    a, b = _records(one), _records(two)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == list(range(1, EPOCHS + 1))
    loss_a, loss_b = np.array([r["train_loss"] for r in a]), np.array([r["train_loss"] for r in b])
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=0)
    # Validation ran once per epoch, on rank 0 only, over the same rows.
    for ra, rb in zip(a, b):
        assert rb["val"]["videos"] == ra["val"]["videos"]
        assert rb["val"]["accuracy"] == pytest.approx(ra["val"]["accuracy"], abs=1e-9)

    # Final weights (the resumable state) agree to float rounding.
    wa = load_file(str(one / "last" / "state.safetensors"))
    wb = load_file(str(two / "last" / "state.safetensors"))
    model_keys = sorted(k for k in wa if k.startswith("model."))
    assert model_keys == sorted(k for k in wb if k.startswith("model."))
    for k in model_keys:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")

    # Rank 0 alone wrote: the same files, one metrics line per epoch.
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert len((two / "metrics.jsonl").read_text().splitlines()) == EPOCHS


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not torch.distributed.is_nccl_available(), reason="needs two CUDA GPUs with NCCL")
def test_two_gpus_with_nccl_get_through_training(root: Path, tmp_path: Path):
    """NCCL reduces only CUDA tensors: the epoch-end reductions must live on the rank's GPU."""
    args = _train_args(root, tmp_path / "gpu", 6, "adam") + ["--device", "cuda"]
    _run(args, 2, tmp_path)
    assert len(_records(tmp_path / "gpu")) == EPOCHS

