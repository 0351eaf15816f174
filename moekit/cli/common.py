"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import textwrap


def add_command(sub, name: str, help: str, description: str, examples: str, func) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with runnable examples."""
    p = sub.add_parser(
        name, help=help, description=textwrap.dedent(description).strip(),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func, command=name)
    return p


def comma_ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of integers, e.g. 0,-1") from None


def add_optimization_args(g, **helps: str) -> None:
    """Optimizer, batch and precision flags the training commands share; ``helps`` replaces a
    flag's help by its field name (each command states its own defaults)."""
    from moekit.train.options import DTYPES, EXPERTS_IMPLEMENTATIONS

    flag = argparse.BooleanOptionalAction
    h = dict(
        learning_rate="peak learning rate",
        lr_scheduler_type="cosine (default), linear, constant ...",
        warmup_steps="warm-up steps, or a fraction below 1 (default 0.03)",
        weight_decay="AdamW weight decay (default 0)",
        per_device_train_batch_size="examples per device (default 2)",
        gradient_accumulation_steps="micro-batches per step (default 8)",
        gradient_checkpointing="recompute activations (default on)",
        bf16="bf16 autocast (default: on when the GPU supports it)",
        dtype="weight dtype at load (default auto)",
        experts_implementation="fused-experts kernel (default grouped_mm)",
        seed="seed (default 0)",
    )
    h.update(helps)
    g.add_argument("--learning-rate", type=float, metavar="LR", help=h["learning_rate"])
    g.add_argument("--lr-scheduler-type", metavar="NAME", help=h["lr_scheduler_type"])
    g.add_argument("--warmup-steps", type=float, metavar="N", help=h["warmup_steps"])
    g.add_argument("--weight-decay", type=float, metavar="W", help=h["weight_decay"])
    g.add_argument("--per-device-train-batch-size", type=int, metavar="B", help=h["per_device_train_batch_size"])
    g.add_argument("--gradient-accumulation-steps", type=int, metavar="N", help=h["gradient_accumulation_steps"])
    g.add_argument("--gradient-checkpointing", action=flag, default=None, help=h["gradient_checkpointing"])
    g.add_argument("--bf16", action=flag, default=None, help=h["bf16"])
    g.add_argument("--dtype", choices=DTYPES, help=h["dtype"])
    g.add_argument("--experts-implementation", choices=EXPERTS_IMPLEMENTATIONS, help=h["experts_implementation"])
    g.add_argument("--seed", type=int, help=h["seed"])


def add_run_args(g) -> None:
    """Logging, checkpoint, resume and launch flags shared by the training commands."""
    from moekit.train.launch import SHIPPED

    g.add_argument("--logging-steps", type=int, metavar="N", help="log every N steps (default 10)")
    g.add_argument("--eval-steps", type=int, metavar="N", help="evaluate every N steps (default: --save-steps)")
    g.add_argument("--save-steps", type=int, metavar="N", help="checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", type=int, metavar="N", help="checkpoints kept (default 2)")
    g.add_argument("--report-to", metavar="LIST", help="tensorboard (default) or none")
    g.add_argument("--resume", dest="resume_from_checkpoint", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue the interrupted run for OUT (or from checkpoint folder CKPT)")
    g.add_argument("--force", action="store_true", default=None, help="replace OUT and any interrupted run")
    g.add_argument("--revision", help="Hub revision of MODEL")
    g.add_argument("--accelerate-config", metavar="NAME|YAML", help=f"run under accelerate launch: {', '.join(SHIPPED)} or a file")
    g.add_argument("--num-processes", type=int, metavar="N", help="accelerate processes (default: the config's)")
