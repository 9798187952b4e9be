"""The command line: the only layer that parses arguments, prints, and picks exit codes.

One module per command (``avel/cli/<command>.py``: ``add`` declares its arguments, ``run`` calls the
library and prints); the option groups commands share are declared once in :mod:`.args`, and
:func:`main` turns library errors into ``avel COMMAND: error: MESSAGE`` and an exit code.
"""
from .app import build_parser, main

__all__ = ["build_parser", "main"]
