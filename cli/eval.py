"""`retrac eval`: reproduce the paper's findings on built-in data, or measure norm bias on your own run.

- `retrac eval run`: the outlier-model experiment end to end (train, index, query, evaluate); prints
  the TracIn-vs-ReTrac table and writes report.json, report.md and PNG figures.
- `retrac eval norms`: gradient norm against training timestep for one checkpoint of a `retrac train`
  run; writes norms.json and two PNG plots.
- `retrac eval lds`: counterfactual validation (LDS over models retrained on random subsets, and the
  removal check); prints the table and writes lds.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

ExperimentPreset = Literal["smoke", "small", "paper"]
LdsPreset = Literal["smoke", "quick"]

app = typer.Typer(
    help="Evaluate attributions: reproduce the paper's findings on built-in data (run), measure gradient "
    "norm against training timestep on your own training run (norms), or validate attributions against "
    "retrained models (lds).",
    short_help="evaluate attributions: outlier experiment, norm vs timestep, LDS",
)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="eval")


@app.command(
    "run",
    help="Train a DDPM on a majority group plus planted outliers, index it, query it, and compare TracIn "
    "with ReTrac on U@k, generally influential samples, precision@k, outlier intrusion, self-influence and "
    "norm vs timestep.",
    short_help="the outlier-model experiment, end to end",
)
def run_experiment_command(
    preset: Annotated[
        ExperimentPreset,
        typer.Option(help="smoke (seconds), small (minutes), paper (the README's, ~15 min on 2 cores)"),
    ] = "small",
    config: Annotated[
        Path | None, typer.Option(help="an ExperimentConfig JSON file (overrides --preset)")
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("retrac-eval"),
) -> int:
    import torch
    from pydantic import ValidationError

    from retrac.evaluation.experiment import PRESETS, ExperimentConfig, run_experiment
    from retrac.evaluation.report import headline_table
    from retrac.exceptions import SpecError

    torch.set_num_threads(1)  # one thread: the 2-core machines run torch far slower when cores contend
    if config is not None:
        try:
            config = ExperimentConfig.model_validate(json.loads(config.read_text()))
        except (OSError, ValueError, ValidationError) as error:
            raise SpecError(f"{config}: not a valid experiment config ({_first_line(error)})") from error
    else:
        config = PRESETS[preset]()
    report = run_experiment(config, out, progress=True)
    print(headline_table(report))
    figures = ", ".join(str(out / name) for name in report.figures)
    print(f"\nreport: {out / 'report.json'} and {out / 'report.md'}\nfigures: {figures}")
    return 0


@app.command(
    "norms",
    help="Exact gradient norm of every training sample at its replayed training step, and a few samples' "
    "norms over the whole timestep grid, with Pearson/Spearman correlations and fit slope.",
    short_help="gradient norm vs training timestep for one checkpoint of a training run",
)
def norms_command(
    run_folder: Annotated[Path, typer.Argument(help="a `retrac train` run folder")],
    epoch: Annotated[
        int | None, typer.Option(help="checkpoint saved after this epoch", show_default="the last")
    ] = None,
    curve_samples: Annotated[int, typer.Option(help="samples averaged on the curve")] = 8,
    curve_timesteps: Annotated[int, typer.Option(help="grid size of the curve")] = 100,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("retrac-norms"),
) -> int:
    import torch
    from tqdm import tqdm

    from retrac.evaluation.norms import analyse_run
    from retrac.replay import TrainingRun

    torch.set_num_threads(1)
    samples = len(TrainingRun.load(run_folder).sample_ids)
    with tqdm(total=samples, desc="norms", unit="sample") as bar:
        result = analyse_run(
            run_folder,
            out,
            epoch=epoch,
            curve_samples=curve_samples,
            curve_timesteps=curve_timesteps,
            on_progress=bar.update,
        )
    print(
        f"epoch {result.checkpoint_epoch}, {result.samples} samples: norm vs timestep "
        f"Pearson {result.pearson:.3f}, Spearman {result.spearman:.3f}, "
        f"slope {result.slope:.4g} per schedule; largest norms near t = {result.t_max} "
        f"(Spearman of norm with |t - t_max| {result.distance_spearman:.3f})"
    )
    print(f"wrote {out / 'norms.json'}, {out / 'norm_timestep.png'}, {out / 'norm_curve.png'}")
    return 0



@app.command(
    "lds",
    help="Counterfactual validation: train models on seeded random subsets of a training set, and report the "
    "linear datamodeling score (Spearman, averaged over held-out queries, of each query's actual loss against "
    "the loss its attributions predict) per method and estimator, with a bootstrap interval; and the change of "
    "each query's loss when its top-k proponents or k random samples are removed and the model retrained.",
    short_help="linear datamodeling score (LDS) and the removal check",
)
def lds_command(
    preset: Annotated[LdsPreset, typer.Option(help="smoke (seconds), quick (32 models, minutes)")] = "quick",
    config: Annotated[Path | None, typer.Option(help="an LdsConfig JSON file (overrides --preset)")] = None,
    workers: Annotated[
        int | None, typer.Option(help="training processes", show_default="the config's (2)")
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("retrac-lds"),
) -> int:
    import torch
    from pydantic import ValidationError

    from retrac.evaluation.lds import LDS_PRESETS, LdsConfig, lds_table, run_lds
    from retrac.exceptions import SpecError

    torch.set_num_threads(1)
    try:
        chosen = LdsConfig.model_validate_json(config.read_text()) if config is not None else LDS_PRESETS[preset]()
        if workers is not None:
            chosen = LdsConfig.model_validate(chosen.model_dump() | {"workers": workers})
    except (OSError, ValueError, ValidationError) as error:
        raise SpecError(f"{config or '--workers'}: not a valid LDS config ({_first_line(error)})") from error
    report = run_lds(chosen, out, progress=True)
    print(lds_table(report))
    print(f"\nreport: {out / 'lds.json'}")
    return 0


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
