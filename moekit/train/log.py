"""One logger for training runs; the CLI turns it on, libraries only log."""

from __future__ import annotations

import logging

logger = logging.getLogger("moekit.train")


def enable_cli_logging(level: int = logging.INFO) -> None:
    """Print moekit's training messages as ``moekit: ...`` lines on stderr (idempotent)."""
    root = logging.getLogger("moekit")
    if not any(getattr(h, "_moekit", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("moekit: %(message)s"))
        handler._moekit = True
        root.addHandler(handler)
    root.setLevel(level)
