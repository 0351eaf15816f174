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
