"""Turning a finished run folder into the output folder, all at once.

Training writes checkpoints and TensorBoard logs into the run folder (a hidden
sibling of the output). When training is done, the command writes its extras
(card, recipe, merged model ...) into a temporary folder, the trained weights and
logs are moved in last, and the folder is renamed to the output: a failure at any
point leaves no output folder, and the run folder stays for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from moekit.io import atomic_output

RECIPE_FILE = "moekit_recipe.yaml"
LOG_FILE = "moekit_train_log.json"


def publish(run: Path, final: Path, output: str | Path, *, force: bool, log_history: list[dict],
            write: Callable[[Path], None]) -> Path:
    """Assemble ``output`` from ``final`` (the saved weights), ``run/runs`` (TensorBoard) and ``write(tmp)``.

    ``write`` runs first and may read ``final``; then the weights and logs are moved in
    and the run folder is removed.
    """
    with atomic_output(output, force=force) as tmp:
        write(tmp)
        (tmp / LOG_FILE).write_text(json.dumps(log_history, indent=1))
        for f in final.iterdir():
            os.replace(f, tmp / f.name)
        if (run / "runs").is_dir():
            os.replace(run / "runs", tmp / "runs")
    shutil.rmtree(run, ignore_errors=True)
    return Path(output)


def reproducible(config):
    """``config`` as a recipe that reproduces the run (no resuming, no overwriting)."""
    changes = {k: v for k, v in (("resume_from_checkpoint", False), ("force", False)) if hasattr(config, k)}
    return dataclasses.replace(config, **changes)


def write_recipe(folder: Path, config, section: str) -> str:
    """Save the resolved recipe as ``moekit_recipe.yaml`` (the command's own fields first); returns its text."""
    import yaml

    from moekit.train.options import TrainingOptions

    values = dataclasses.asdict(reproducible(config))
    shared = [f.name for f in dataclasses.fields(TrainingOptions)]
    ordered = {**{k: v for k, v in values.items() if k not in shared}, **{k: values[k] for k in shared}}
    text = yaml.safe_dump({section: ordered}, sort_keys=False)
    (Path(folder) / RECIPE_FILE).write_text(text)
    return text


def loss_summary(log_history: list[dict]) -> dict:
    """First and last logged training loss, and the last eval loss."""
    losses = [e["loss"] for e in log_history if "loss" in e]
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    steps = max((e.get("step", 0) for e in log_history), default=0)
    out = {"steps": steps}
    if losses:
        out.update(first_loss=losses[0], last_loss=losses[-1])
    if evals:
        out["eval_loss"] = evals[-1]
    return out
