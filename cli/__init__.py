"""The `retrac` command line. Each subcommand group lives in its own module and registers itself.

Errors that retrac raises on purpose (bad input, stale stores, mismatches) end the command with
exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import version

from retrac.exceptions import RetracError

COMMAND_MODULES = ("demo", "train", "index", "attribute", "worker", "serve", "eval")
"""Modules of `cli` that each define `register(subparsers)`; they add their subcommands."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrac", description="Data attribution for diffusion models: Diffusion-TracIn and Diffusion-ReTrac."
    )
    parser.add_argument("--version", action="version", version=f"retrac {version('retrac')}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except RetracError as error:
        print(f"retrac: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retrac: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
