"""The `retrac` command line, on typer: each command group lives in its own module.

Every flag's default is shown in `--help` and read from its spec or settings class; `retrac
--install-completion` installs shell completion. Bad input ends the command with exit code 2 and one
line on stderr, never a usage dump or a traceback: a flag that does not parse (click's usage errors)
exits through SystemExit(2) as argparse did, and the errors retrac raises on purpose (bad values, stale
stores, mismatches) make `main` return 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.metadata import version
from typing import Annotated

import typer

from cli import attribute, demo, index, self_influence, serve, train, worker
from cli import eval as evaluation
from retrac.exceptions import RetracError

app = typer.Typer(
    name="retrac",
    help="Data attribution for diffusion models: Diffusion-TracIn and Diffusion-ReTrac.",
    rich_markup_mode=None,  # plain click help and errors: one line per error, no boxes
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"retrac {version('retrac')}")
        raise typer.Exit()


@app.callback()
def _retrac(
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """The options of `retrac` itself; each command is registered by its module below."""


for module in (demo, train, index, attribute, self_influence, worker, serve, evaluation):
    module.register(app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `retrac` on `argv` (default: the process's arguments); returns the exit code."""
    command = typer.main.get_command(app)
    command._main_shell_completion({}, "retrac", None)  # a completion request (the shell's) answers and exits
    try:
        with command.make_context("retrac", list(sys.argv[1:] if argv is None else argv)) as context:
            return int(command.invoke(context) or 0)
    except typer.Exit as done:  # --help, --version, --show-completion
        raise SystemExit(done.exit_code) from None
    except typer.TyperException as error:  # a flag or argument that does not parse (click's usage errors)
        print(f"retrac: error: {error.format_message()}", file=sys.stderr)
        raise SystemExit(2) from None
    except RetracError as error:
        print(f"retrac: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        print("retrac: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
