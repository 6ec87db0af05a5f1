"""`retrac train`: train a DDPM that records its replay, with a progress bar."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from api_schemas import DatasetSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.losses import LOSS_KINDS
from retrac.models import PRESETS
from retrac.training import train


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a DDPM and record every step's timestep and noise seed",
        description="Train a diffusers UNet2DModel + DDPMScheduler; save diffusers checkpoints and a replay record.",
    )
    parser.add_argument("out", type=Path, help="run folder to write (manifest, record, checkpoints)")
    add_dataset_arguments(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="UNet size (default: tiny)")
    parser.add_argument("--loss", choices=LOSS_KINDS, default="mse", help="noise-prediction loss (default: mse)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int, default=5, help="save a checkpoint every E epochs (and the last)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, default=1000, help="T of the DDPM schedule")
    parser.set_defaults(run=run)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset flags every command that reads a dataset shares."""
    parser.add_argument("--data", default="builtin:digits", help="builtin:NAME, image folder, .npy or .npz")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the source's random choices")


def dataset_spec(args: argparse.Namespace) -> DatasetSpec:
    return DatasetSpec(
        source=args.data, resolution=args.resolution, channels=args.channels, limit=args.limit, seed=args.data_seed
    )


def run(args: argparse.Namespace) -> int:
    spec = TrainSpec(
        dataset=dataset_spec(args),
        preset=args.preset,
        loss=args.loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        save_every=args.save_every,
        seed=args.seed,
        num_timesteps=args.timesteps,
    )
    dataset = load_dataset(spec.dataset)
    with tqdm(total=spec.epochs, unit="epoch", desc="train") as bar:

        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        trained = train(spec, dataset, args.out, on_epoch=on_epoch)
    print(f"{len(trained.checkpoints())} checkpoints and the replay record of {len(dataset)} samples in {args.out}")
    return 0
