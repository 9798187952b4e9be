"""Shared test fixtures: the real AVE metadata and reference fixtures live in ../shared (read in place)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    env = os.environ.get("AVEL_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_root()
    if not (root / "ave" / "Annotations.txt").is_file():
        pytest.fail(f"shared data not found at {root} (set AVEL_SHARED)")
    return root


@pytest.fixture(scope="session")
def ave_dir(shared) -> Path:
    return shared / "ave"


@pytest.fixture(scope="session")
def fixtures_dir(shared) -> Path:
    return shared / "fixtures"


@pytest.fixture(scope="session")
def followups(fixtures_dir) -> Path:
    """The follow-up models' fixtures (PSP, CPSP, AVSDN, CMRAN, CMBS)."""
    return fixtures_dir / "followups"


@pytest.fixture(scope="session")
def regen(followups):
    """The fixtures' own ``regen_weights`` module (rebuilds the seeded reference weights; never copied)."""
    spec = importlib.util.spec_from_file_location("regen_weights", followups / "regen_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Heavy modules run torch on one thread: steadier timings when jobs share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_train_config(monkeypatch):
    """Run `avel train ...` up to the point where the trainer receives its config; return that config."""
    from avel.cli import main

    seen = {}

    def fake_train(config, out, **kw):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("avel.engine.train.train", fake_train)

    def run(argv):
        with pytest.raises(SystemExit):
            main(["train", *argv])
        return seen["config"]

    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
