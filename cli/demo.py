"""`retrac demo`: the embedded default, end to end on built-in data, on the CPU, without Redis.

It is `retrac eval run --preset small`: train a small outlier model with replay, index it, query
it, evaluate TracIn against ReTrac, print the headline table and say where the pictures are. Then
the default query (trak, matched) next to the paper's (tracin and retrac) on the same model
(`retrac.evaluation.estimators`), each with a line on what it is for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.eval import ExperimentPreset, run_experiment_command

QUERIES = 8
"""Training images (and their 1-pixel shifts) the default and the paper's query are compared on."""


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        help="The embedded default: the small version of the README's experiment, end to end "
        "(CPU, no Redis), then the default query next to the paper's.",
        short_help="train, index, query and evaluate a small outlier model on built-in data (CPU, no Redis)",
    )(demo)


def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("retrac-demo"),
    preset: Annotated[ExperimentPreset, typer.Option(help="smoke (seconds) or small (minutes)")] = "small",
) -> int:
    from retrac.evaluation.estimators import compare_estimators, table
    from retrac.evaluation.experiment import PRESETS

    run_experiment_command(preset=preset, config=None, out=out)
    rows = compare_estimators(out / "run", QUERIES, PRESETS[preset]().query)
    print("\nThe default query next to the paper's, on the same model:\n")
    print(table(rows, QUERIES))
    return 0
