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
