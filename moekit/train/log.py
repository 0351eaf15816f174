"""One logger for training runs; the CLI turns it on, libraries only log."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("moekit.train")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks swap it), not the one at setup."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it
        pass


def enable_cli_logging(level: int = logging.INFO) -> None:
    """Print moekit's training messages as ``moekit: ...`` lines on stderr (idempotent).

    In multi-process runs only the first process reports; the others print warnings and errors.
    """
    root = logging.getLogger("moekit")
    if not any(getattr(h, "_moekit", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("moekit: %(message)s"))
        handler._moekit = True
        root.addHandler(handler)
    root.setLevel(level if os.environ.get("RANK", "0") == "0" else max(level, logging.WARNING))
