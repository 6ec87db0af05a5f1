"""The README's outlier-model experiment (`ExperimentConfig.paper()`), end to end; prints its report.

    .venv/bin/python bench/paper.py --out out/paper --figures docs/figures

Trains, indexes, queries and evaluates (about 15 minutes on 2 CPU cores), writes report.json,
report.md and the PNG figures into --out, copies the figures into --figures if given, and prints
the report as one JSON object on stdout (progress bars go to stderr). Timings are for orientation
only; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from retrac.evaluation.experiment import PRESETS, run_experiment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--out", type=Path, default=Path("out/paper"), help="report folder")
    parser.add_argument("--figures", type=Path, help="also copy the PNG figures here (e.g. docs/figures)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one thread: two contending processes run torch far slower on 2 cores
    report = run_experiment(PRESETS[args.preset](), args.out, progress=True)
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for name in report.figures:
            shutil.copyfile(args.out / name, args.figures / name)
    print(json.dumps(report.model_dump(mode="json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
