"""The ``lowrank-attn`` command line: a thin layer over the Python API, one module per command (``analyze``,
``compress``, ``evaluate`` for ``eval``, ``sweep``) on the app of ``app``. Every heavy import is inside a command
body, so ``--help`` and a mistyped flag answer at once.

Errors of type ``LowrankAttnError`` print one line and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os

from . import analyze, compress, evaluate, sweep  # noqa: F401  (each registers its command on the app)
from .app import app

__all__ = ["app", "entry"]


def entry() -> None:  # pragma: no cover - console script wrapper
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
