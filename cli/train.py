"""`retrac train`: train a DDPM that records its replay, with a progress bar."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, get_args

from tqdm import tqdm

from api_schemas import BetaSchedule, PredictionType, TrainSpec
from cli.common import add_dataset_arguments, dataset_spec, given, validated
from retrac.datasets import load_dataset
from retrac.exceptions import SpecError
from retrac.losses import LOSS_KINDS
from retrac.models import PRESETS
from retrac.training import train

TRAIN_FLAGS = {
    "preset": "preset", "loss": "loss", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "save_every": "save_every", "seed": "seed", "timesteps": "num_timesteps",
    "beta_schedule": "beta_schedule", "prediction_type": "prediction_type",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a DDPM and record every step's timestep and noise seed",
        description="Train a diffusers UNet2DModel + DDPMScheduler; save diffusers checkpoints and a replay record. "
        "Defaults are those of TrainSpec; --config gives a TrainSpec JSON that typed flags override.",
    )
    parser.add_argument("out", type=Path, help="run folder to write (manifest, record, checkpoints)")
    parser.add_argument("--config", type=Path, help="a TrainSpec JSON file")
    add_dataset_arguments(parser, default="builtin:digits")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="UNet size (default: tiny)")
    parser.add_argument("--loss", choices=LOSS_KINDS, help="noise-prediction loss (default: mse)")
    parser.add_argument("--epochs", type=int, help="default: 10")
    parser.add_argument("--batch-size", type=int, help="default: 32")
    parser.add_argument("--lr", type=float, help="default: 1e-3")
    parser.add_argument("--save-every", type=int, help="save a checkpoint every E epochs and after the last (default: 5)")
    parser.add_argument("--seed", type=int, help="default: 0")
    parser.add_argument("--timesteps", type=int, help="T of the DDPM schedule (default: 1000)")
    parser.add_argument(
        "--beta-schedule", choices=get_args(BetaSchedule), help="diffusers' beta schedule (default: linear)"
    )
    parser.add_argument(
        "--prediction-type", choices=get_args(PredictionType), help="what the UNet predicts (default: epsilon)"
    )
    parser.set_defaults(run=run)


def train_spec(args: argparse.Namespace) -> TrainSpec:
    """The spec from `--config` (if any) with every flag the user typed laid over it."""
    base: dict[str, Any] = {}
    if args.config is not None:
        try:
            base = json.loads(args.config.read_text())
        except (OSError, ValueError) as error:
            raise SpecError(f"{args.config}: cannot read the config ({error})") from error
    dataset = dataset_spec(args, base.pop("dataset", None))
    return validated(TrainSpec, {**base, **given(args, TRAIN_FLAGS), "dataset": dataset})


def run(args: argparse.Namespace) -> int:
    spec = train_spec(args)
    dataset = load_dataset(spec.dataset)
    with tqdm(total=spec.epochs, unit="epoch", desc="train") as bar:

        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        trained = train(spec, dataset, args.out, on_epoch=on_epoch)
    print(f"{len(trained.checkpoints())} checkpoints and the replay record of {len(dataset)} samples in {args.out}")
    return 0
