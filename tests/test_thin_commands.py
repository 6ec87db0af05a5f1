"""Thin commands: every `retrac` command, signature included, fits in `MAX_COMMAND_LINES`.

A command turns its flags into a spec (`cli.specs`), calls the engine and hands the answer to
`cli.render`; its options are declared once in `cli.options`. A command that grows past the limit is
doing one of those jobs itself.
"""

from __future__ import annotations

import inspect

import click
import typer

from cli import app

MAX_COMMAND_LINES = 60


def commands(group: click.Command, prefix: str = "retrac") -> dict[str, click.Command]:
    found = {prefix: group}
    for name, sub in getattr(group, "commands", {}).items():
        found |= commands(sub, f"{prefix} {name}")
    return found


def test_every_command_is_thin() -> None:
    every = commands(typer.main.get_command(app))
    lengths = {
        name: len(inspect.getsourcelines(inspect.unwrap(command.callback))[0])
        for name, command in every.items()
        if command.callback is not None
    }
    assert len(lengths) >= 15  # every command was found, not only the groups
    assert {name: n for name, n in lengths.items() if n > MAX_COMMAND_LINES} == {}
