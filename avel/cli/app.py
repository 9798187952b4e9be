"""The ``avel`` command: one parser, one module per command, and the one place errors become exit codes.

Library code raises typed errors and never prints; here every such error becomes one line,
``avel COMMAND: error: MESSAGE`` on stderr, and exit code 2 (``-vv`` adds the traceback). A command
returns its own code otherwise (``data check`` 1 for problems found, ``localize`` 1 when some videos
failed). Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from .._version import __version__
from ..features.decode import VideoDecodeError
from ..features.weights import WeightsNotFoundError
from ..io import FolderBusyError
from . import convert, data, demo, evaluate, extract, localize, models, train, visualize
from .args import groups

log = logging.getLogger("avel")

COMMANDS = (demo, train, evaluate, models, convert, data, extract, localize, visualize)   # in --help order
# What the library raises for bad input: data, configs, checkpoints and cards (ValueError and its
# subclasses), unknown names (KeyError), files (OSError), undecodable videos, a folder another live
# run holds (FolderBusyError).
LIBRARY_ERRORS = (ValueError, KeyError, OSError, VideoDecodeError, FolderBusyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avel", description="Audio-visual event localization (AVE) toolkit")
    parser.add_argument("--version", action="version", version=f"avel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = groups()
    for command in COMMANDS:
        command.add(sub, g)
    return parser


def error_message(e: BaseException) -> str:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)   # KeyError's str() adds quotes
    if isinstance(e, WeightsNotFoundError):
        message += "\n(on the command line: --audio-weights FILE / --visual-weights FILE)"
    return str(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    logging.basicConfig(level=logging.WARNING - 10 * min(2, verbose),    # -v: INFO, -vv: DEBUG
                        format="%(levelname)s %(name)s: %(message)s")
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        return int(args.func(args) or 0)
    except LIBRARY_ERRORS as e:
        if verbose > 1:
            traceback.print_exc()
        print(f"avel {name}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"avel {name}: interrupted", file=sys.stderr)
        return 130
