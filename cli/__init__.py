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

COMMAND_MODULES = ("demo", "train", "index", "attribute", "self_influence", "worker", "serve", "eval")
"""Modules of `cli` that each define `register(subparsers)`; they add their subcommands."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults-in-help, except where there is no default to show or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrac",
        description="Data attribution for diffusion models: Diffusion-TracIn and Diffusion-ReTrac.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"retrac {version('retrac')}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.{name}").register(subparsers)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's --help shows its defaults."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


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
