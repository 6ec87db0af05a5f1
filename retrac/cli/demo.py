"""`retrac demo`: the embedded default, end to end on built-in data, on the CPU, without Redis.

It runs the small outlier-model experiment (train with replay, index, query, evaluate) and prints
the headline TracIn-vs-ReTrac table and where the pictures are.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train, index, query and evaluate a small outlier model on built-in data (CPU, no Redis)",
        description="The embedded default: the small version of the README's experiment, end to end.",
    )
    parser.add_argument("--out", type=Path, default=Path("retrac-demo"), help="output folder (default: retrac-demo)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from retrac.evaluation.experiment import ExperimentConfig, run_experiment
    from retrac.evaluation.report import headline_table

    report = run_experiment(ExperimentConfig.small(), args.out, progress=True)
    print(headline_table(report))
    print(f"\nreport: {args.out / 'report.json'}   figures: {args.out}/*.png   table: {args.out / 'report.md'}")
    return 0
