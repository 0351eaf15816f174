"""The benchmark scripts stay runnable: --help works and every moekit name they import exists.

Benchmarks import moekit lazily, inside the functions that run for minutes on a GPU or the
real model; a renamed function would otherwise surface only there.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import os
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


def test_finetune_benchmark_runs_end_to_end_in_smoke_mode(tmp_path):
    """The GPU benchmark's whole flow (checkpoint, QLoRA load, PEFT, moekit's NF4 experts, training) on
    tiny shapes on the CPU, so a GPU session does not spend its minutes finding a broken script."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    script = Path(__file__).parent.parent / "benchmarks" / "bench_finetune.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--only", "moekit qlora", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["benchmark"].startswith("finetune (smoke")
    results = report["results"]
    assert [r["targets"] for r in results] == ["attention", "attention,experts"]
    for r in results:
        assert "error" not in r, r
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    assert results[1]["trainable_params"] > results[0]["trainable_params"]  # expert LoRA came on top


def test_throughput_benchmark_runs_end_to_end_in_smoke_mode():
    """Every case of the GPU throughput benchmark, moekit.pretrain's included, on tiny shapes on the CPU."""
    pytest.importorskip("trl")
    script = Path(__file__).parent.parent / "benchmarks" / "bench_pretrain_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]
    assert set(results) == {"dense", "moe8_top2_grouped", "moe8_top2_eager", "moe16_top4_grouped", "moe8_top2_moekit"}
    assert all(r.get("tokens_per_s", 0) > 0 and "error" not in r for r in results.values()), results
    # the same weights give the same first loss whichever expert kernel runs
    assert results["moe8_top2_grouped"]["first_loss"] == pytest.approx(results["moe8_top2_eager"]["first_loss"], abs=1e-2)
