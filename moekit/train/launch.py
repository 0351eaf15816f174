"""Multi-GPU runs through ``accelerate launch``, the way ``trl sft --accelerate_config`` does it.

The command resolves its config once, writes it as a recipe, and relaunches
``moekit <command> --config <recipe>`` under accelerate: every worker runs the
exact resolved settings, and nothing is re-parsed from a half-edited command line.
Shipped configs (package data in ``moekit/accelerate_configs``): ``ddp``, ``fsdp2``,
``zero2``, ``zero3``; any accelerate YAML path works too.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from importlib import resources
from pathlib import Path

from moekit.errors import ConfigError, MoekitError

SHIPPED = ("ddp", "fsdp2", "zero2", "zero3")
GPU_ONLY = ("FSDP", "DEEPSPEED")  # accelerate runs these only on GPUs (on CPUs it would silently fall back to DDP)


def accelerate_config_path(name: str) -> Path:
    """A shipped config by name, or an existing accelerate YAML file."""
    if name in SHIPPED:
        return Path(str(resources.files("moekit") / "accelerate_configs" / f"{name}.yaml"))
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise ConfigError(f"accelerate_config={name!r} is neither a shipped config ({', '.join(SHIPPED)}) nor a file — "
                      "pick one of those names or pass the path of an `accelerate config` YAML")


def distributed_type(name: str) -> str:
    """The ``distributed_type`` of an accelerate config (shipped name or YAML path): DDP is ``MULTI_GPU``."""
    import yaml

    return (yaml.safe_load(accelerate_config_path(name).read_text()) or {}).get("distributed_type", "")


def cpu_only() -> bool:
    """Training runs on the CPU: no CUDA, and no Apple GPU either — or several processes, which
    an Apple GPU cannot share (they then run DDP over gloo on the CPU)."""
    import torch

    if torch.cuda.is_available():
        return False
    return not torch.backends.mps.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's ``PartialState`` for this process, created the same way everywhere.

    It is a singleton: the first construction decides. On a CPU-only machine it must be told
    ``cpu=True``, or workers started by ``torchrun`` each believe they are alone (and the
    Trainer then skips DDP).
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def launched() -> bool:
    """True inside a worker started by ``accelerate launch`` / ``torchrun``."""
    return "LOCAL_RANK" in os.environ or os.environ.get("ACCELERATE_LAUNCHED_BY_MOEKIT") == "1"


def relaunch(config, section: str) -> int:
    """Run ``moekit <section>`` with ``config`` in ``config.num_processes`` accelerate workers.

    Example:
        >>> relaunch(FinetuneConfig("moe", "out", data="chat.jsonl", accelerate_config="ddp"), "finetune")  # doctest: +SKIP
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    from moekit.config import to_recipe

    import torch

    path = accelerate_config_path(config.accelerate_config)
    kind = distributed_type(config.accelerate_config)
    if kind in GPU_ONLY and not torch.cuda.is_available():
        raise ConfigError(f"accelerate_config={config.accelerate_config!r} ({kind}) needs CUDA GPUs and none is "
                          "visible — use --accelerate-config ddp (runs over gloo on CPUs) or run on GPUs")
    # moekit decides mixed precision (options.bf16, else bf16 where the GPU supports it), not the YAML
    bf16 = config.bf16 if config.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    child = dataclasses.replace(config, accelerate_config=None, num_processes=None)
    fd, recipe = tempfile.mkstemp(prefix=f"moekit-{section}-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(to_recipe(child, section))
    args = ["--config_file", str(path), "--mixed_precision", "bf16" if bf16 else "no"]
    if config.num_processes:
        args += ["--num_processes", str(config.num_processes)]
    args += ["--module", "moekit.cli.main", section, "--config", recipe]
    os.environ["ACCELERATE_LAUNCHED_BY_MOEKIT"] = "1"
    try:
        launch_command(launch_command_parser().parse_args(args))
    except (Exception, SystemExit) as e:  # workers printed their own errors; say where to look
        raise MoekitError(f"the accelerate workers failed ({e.__class__.__name__}) — see their output above; "
                          f"rerun with --resume to continue from the last checkpoint") from None
    finally:
        os.environ.pop("ACCELERATE_LAUNCHED_BY_MOEKIT", None)
        os.unlink(recipe)
    return 0
