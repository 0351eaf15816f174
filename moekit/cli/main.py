"""``moekit`` entry point: one sub-command per pipeline stage.

Every command module in ``COMMANDS`` exposes ``register(subparsers)`` and sets
``func`` on its parser. Errors the user can fix (``MoekitError``) become one
line on stderr and exit 1; ``MOEKIT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order = the pipeline order shown in --help.
COMMANDS = ["quickstart", "upcycle", "pretrain", "eval", "finetune", "merge", "push"]

DESCRIPTION = """\
Turn a dense LLaMA-family model into a Mixture-of-Experts that stock
transformers loads (no trust_remote_code) and vLLM serves.

pipeline:  upcycle -> pretrain -> finetune -> merge -> push, with eval anywhere.
start here: moekit quickstart   (offline, SmolLM2-135M, a few minutes on a CPU)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from moekit import __version__

    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moekit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from moekit.errors import MoekitError

    try:
        result = args.func(args)
    except MoekitError as e:
        if os.environ.get("MOEKIT_DEBUG") == "1":
            raise
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted — nothing was written", file=sys.stderr)
        return 130
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
