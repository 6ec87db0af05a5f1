"""`retrac demo`: the embedded default, end to end on built-in data, on the CPU, without Redis.

It is `retrac eval run --preset small`: train a small outlier model with replay, index it, query
it, evaluate TracIn against ReTrac, print the headline table and say where the pictures are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.eval import run_experiment_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train, index, query and evaluate a small outlier model on built-in data (CPU, no Redis)",
        description="The embedded default: the small version of the README's experiment, end to end.",
    )
    parser.add_argument("--out", type=Path, default=Path("retrac-demo"), help="output folder (default: retrac-demo)")
    parser.set_defaults(run=run_experiment_command, preset="small", config=None)
