"""`retrac demo`: the embedded default, end to end on built-in data, on the CPU, without Redis.

It is `retrac eval run --preset small`: train a small outlier model with replay, index it, query
it, evaluate TracIn against ReTrac, print the headline table and say where the pictures are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.eval import run_experiment_command


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        help="The embedded default: the small version of the README's experiment, end to end "
        "(CPU, no Redis).",
        short_help="train, index, query and evaluate a small outlier model on built-in data (CPU, no Redis)",
    )(demo)


def demo(out: Annotated[Path, typer.Option(help="output folder")] = Path("retrac-demo")) -> int:
    return run_experiment_command(preset="small", config=None, out=out)
