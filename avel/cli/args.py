"""The option groups several commands share, declared once and attached as argparse parents."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


def _group(*options: tuple[tuple[str, ...], dict]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for flags, kwargs in options:
        p.add_argument(*flags, **kwargs)
    return p


@dataclass(frozen=True)
class Groups:
    """Parent parsers: ``common`` goes on every command, the others where they apply."""

    common: argparse.ArgumentParser
    data: argparse.ArgumentParser
    checkpoint: argparse.ArgumentParser
    json: argparse.ArgumentParser
    weights: argparse.ArgumentParser
    progress: argparse.ArgumentParser


def groups() -> Groups:
    return Groups(
        common=_group(
            (("-v", "--verbose"), dict(action="count", default=0, help="more logging (-vv: debug, and tracebacks)")),
            (("--device",), dict(default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"))),
        data=_group(
            (("--data-root",), dict(required=True, type=Path, help="AVE-layout folder (official release or avel-made)")),
            (("--layout",), dict(choices=["auto", "h5", "packed"], default="auto",
                                 help="feature files to read: packed when present (auto), the h5 files, or packed only"))),
        checkpoint=_group(
            (("--checkpoint",), dict(required=True, type=Path, help="run folder or checkpoint folder"))),
        json=_group(
            (("--json",), dict(action="store_true", help="print one JSON object instead of text"))),
        weights=_group(
            (("--audio-weights",), dict(help="weights file for the audio backbone ('random' only if you mean it)")),
            (("--visual-weights",), dict(help="weights file for the visual backbone ('random' only if you mean it)"))),
        progress=_group(
            (("--no-progress",), dict(action="store_true", help="no progress bars"))),
    )
