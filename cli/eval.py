"""`retrac eval`: reproduce the paper's findings on built-in data, or measure norm bias on your own run.

- `retrac eval run`: the outlier-model experiment end to end (train, index, query, evaluate); prints
  the TracIn-vs-ReTrac table and writes report.json, report.md and PNG figures.
- `retrac eval norms`: gradient norm against training timestep for one checkpoint of a `retrac train`
  run; writes norms.json and two PNG plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESET_NAMES = ("smoke", "small", "paper")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate attributions: outlier experiment, norm vs timestep",
        description="Reproduce the paper's findings on built-in data (run), or measure gradient norm "
        "against training timestep on your own training run (norms).",
    )
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    run_parser = commands.add_parser(
        "run",
        help="the outlier-model experiment, end to end",
        description="Train a DDPM on a majority group plus planted outliers, index it, query it, and compare "
        "TracIn with ReTrac on U@k, generally influential samples, precision@k, outlier intrusion, "
        "self-influence and norm vs timestep.",
    )
    run_parser.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="small",
        help="smoke (seconds), small (minutes), paper (the README's, ~15 min on 2 cores)",
    )
    run_parser.add_argument("--config", type=Path, help="an ExperimentConfig JSON file (overrides --preset)")
    run_parser.add_argument("--out", type=Path, default=Path("retrac-eval"), help="output folder")
    run_parser.set_defaults(run=run_experiment_command)

    norms_parser = commands.add_parser(
        "norms",
        help="gradient norm vs training timestep for one checkpoint of a training run",
        description="Exact gradient norm of every training sample at its replayed training step, and a few "
        "samples' norms over the whole timestep grid, with Pearson/Spearman correlations and fit slope.",
    )
    norms_parser.add_argument("run_folder", type=Path, help="a `retrac train` run folder")
    norms_parser.add_argument(
        "--epoch", type=int, help="checkpoint saved after this epoch (default: the last)"
    )
    norms_parser.add_argument("--curve-samples", type=int, default=8, help="samples averaged on the curve")
    norms_parser.add_argument("--curve-timesteps", type=int, default=100, help="grid size of the curve")
    norms_parser.add_argument("--out", type=Path, default=Path("retrac-norms"), help="output folder")
    norms_parser.set_defaults(run=norms_command)


def run_experiment_command(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError

    from retrac.evaluation.experiment import PRESETS, ExperimentConfig, run_experiment
    from retrac.evaluation.report import headline_table
    from retrac.exceptions import SpecError

    torch.set_num_threads(1)  # one thread: the 2-core machines run torch far slower when cores contend
    if args.config is not None:
        try:
            config = ExperimentConfig.model_validate(json.loads(args.config.read_text()))
        except (OSError, ValueError, ValidationError) as error:
            raise SpecError(f"{args.config}: not a valid experiment config ({_first_line(error)})") from error
    else:
        config = PRESETS[args.preset]()
    report = run_experiment(config, args.out, progress=True)
    print(headline_table(report))
    figures = ", ".join(str(args.out / name) for name in report.figures)
    print(f"\nreport: {args.out / 'report.json'} and {args.out / 'report.md'}\nfigures: {figures}")
    return 0


def norms_command(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from retrac.evaluation.norms import analyse_run
    from retrac.replay import TrainingRun

    torch.set_num_threads(1)
    samples = len(TrainingRun.load(args.run_folder).sample_ids)
    with tqdm(total=samples, desc="norms", unit="sample") as bar:
        result = analyse_run(
            args.run_folder,
            args.out,
            epoch=args.epoch,
            curve_samples=args.curve_samples,
            curve_timesteps=args.curve_timesteps,
            on_progress=bar.update,
        )
    print(
        f"epoch {result.checkpoint_epoch}, {result.samples} samples: norm vs timestep "
        f"Pearson {result.pearson:.3f}, Spearman {result.spearman:.3f}, "
        f"slope {result.slope:.4g} per schedule; largest norms near t = {result.t_max} "
        f"(Spearman of norm with |t - t_max| {result.distance_spearman:.3f})"
    )
    print(f"wrote {args.out / 'norms.json'}, {args.out / 'norm_timestep.png'}, {args.out / 'norm_curve.png'}")
    return 0


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
