"""`retrac train`: train a DDPM that records its replay, with a progress bar."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from api_schemas import DatasetSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.exceptions import SpecError
from retrac.losses import LOSS_KINDS
from retrac.models import PRESETS
from retrac.training import train

DATASET_FLAGS = {"data": "source", "resolution": "resolution", "channels": "channels", "limit": "limit", "data_seed": "seed"}
TRAIN_FLAGS = {
    "preset": "preset", "loss": "loss", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "save_every": "save_every", "seed": "seed", "timesteps": "num_timesteps",
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
    add_dataset_arguments(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="UNet size (default: tiny)")
    parser.add_argument("--loss", choices=LOSS_KINDS, help="noise-prediction loss (default: mse)")
    parser.add_argument("--epochs", type=int, help="default: 10")
    parser.add_argument("--batch-size", type=int, help="default: 32")
    parser.add_argument("--lr", type=float, help="default: 1e-3")
    parser.add_argument("--save-every", type=int, help="save a checkpoint every E epochs and after the last (default: 5)")
    parser.add_argument("--seed", type=int, help="default: 0")
    parser.add_argument("--timesteps", type=int, help="T of the DDPM schedule (default: 1000)")
    parser.set_defaults(run=run)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset flags every command that reads a dataset shares (unset flags keep DatasetSpec's defaults)."""
    parser.add_argument("--data", help="builtin:NAME, image folder, .npy or .npz (default: builtin:digits)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: 16)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 grey or 3 RGB (default: 1)")
    parser.add_argument("--limit", type=int, help="use only the first N samples")
    parser.add_argument("--data-seed", type=int, help="seed of the source's random choices (default: 0)")


def given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """The flags of `names` the user typed, renamed to spec fields."""
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag) is not None}


def dataset_spec(args: argparse.Namespace, base: dict[str, Any] | None = None) -> DatasetSpec:
    fields = {"source": "builtin:digits", **(base or {}), **given(args, DATASET_FLAGS)}
    return _validated(DatasetSpec, fields)


def train_spec(args: argparse.Namespace) -> TrainSpec:
    """The spec from `--config` (if any) with every flag the user typed laid over it."""
    base: dict[str, Any] = {}
    if args.config is not None:
        try:
            base = json.loads(args.config.read_text())
        except (OSError, ValueError) as error:
            raise SpecError(f"{args.config}: cannot read the config ({error})") from error
    dataset = dataset_spec(args, base.pop("dataset", None))
    return _validated(TrainSpec, {**base, **given(args, TRAIN_FLAGS), "dataset": dataset})


def _validated(model: type, fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SpecError(f"{where}: {first['msg']}") from error


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
