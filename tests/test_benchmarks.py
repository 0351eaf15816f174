"""The benchmark scripts stay runnable: --help works and every moekit name they import exists.

Benchmarks import moekit lazily, inside the functions that run for minutes on a GPU or the
real model; a renamed function would otherwise surface only there.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))


def moekit_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] == "moekit" for alias in node.names]


def test_benchmarks_are_found_and_use_moekit():
    assert len(BENCHMARKS) >= 7 and sum(bool(moekit_imports(p)) for p in BENCHMARKS) >= 5


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_imports_resolve_and_help_runs(path):
    for module, name in moekit_imports(path):
        found = hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}")
        assert found, f"{path.name}: from {module} import {name}"
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-500:]
