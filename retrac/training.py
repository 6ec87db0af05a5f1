"""`retrac train`: a DDPM trainer that records, for every step, what attribution must replay.

For every epoch and every sample it records the timestep and noise seed the sample was trained at,
and the per-sample loss of that step. Every sample is trained every epoch: the last batch of an
epoch is simply smaller, never dropped. A run folder holds:

    manifest.json                      the TrainSpec, sample ids, dataset fingerprint, checkpoints
    replay.safetensors                 timesteps (E, N) int64, seeds (E, N) int64, losses (E, N) float32
    scheduler/scheduler_config.json    the DDPM noise schedule
    checkpoints/epoch-0005/            a diffusers UNet folder per saved checkpoint

The same seed gives the same run, bit for bit, on the CPU. A class-conditional run
(`TrainSpec.class_conditional`) trains a UNet with a class embedding on the dataset's labels,
records them in the manifest, and saves each checkpoint as diffusers saves it (`num_class_embeds`
in its config.json).

`RECIPES` names whole settings: `paper` is the paper's own (L1 loss, cosine betas clipped to
[1e-4, 0.02], T = 1000; queried with K = 100, M = 16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from api_schemas import QuerySpec, TrainSpec
from retrac.conditions import Conditions
from retrac.datasets import ImageDataset
from retrac.exceptions import SpecError
from retrac.losses import noised, per_sample_loss
from retrac.models import DiffusionModel, build_unet
from retrac.noise import draw_seeds, noise_from_seeds
from retrac.replay import TrainingRun, write_run

ProgressCallback = Callable[[int, float], object]
"""Called after each epoch with (epoch, mean loss)."""

PAPER_BETA_RANGE = (1e-4, 0.02)
"""Where the paper's models clip their cosine betas: the range of DDPM's linear schedule."""
COSINE_OFFSET = 0.008
"""s of the cosine schedule (Nichol and Dhariwal 2021, eq. 17): keeps beta_0 away from zero."""


@dataclass(frozen=True)
class Recipe:
    """A named setting: the TrainSpec fields it fixes, and the query estimator to attribute with."""

    train: dict[str, Any] = field(default_factory=dict)
    query: QuerySpec = field(default_factory=QuerySpec)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        train={"loss": "l1", "beta_schedule": "cosine_clipped", "num_timesteps": 1000},
        query=QuerySpec(timesteps=100, draws=16),
    ),
}
"""`retrac train --recipe NAME` lays `train` over its spec; `query` is the K and M to query it with."""


def clipped_cosine_betas(num_timesteps: int) -> np.ndarray:
    """`(T,)` float64 betas of the cosine schedule, `1 - alpha_bar(t + 1) / alpha_bar(t)` with
    `alpha_bar(t) = cos^2((t / T + s) / (1 + s) * pi / 2)`, clipped to `PAPER_BETA_RANGE`."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], *PAPER_BETA_RANGE)


def noise_scheduler(spec: TrainSpec) -> DDPMScheduler:
    """The DDPM schedule of a run. `cosine_clipped` is saved as trained betas, so that any diffusers
    reader (and `retrac index`) gets the exact schedule without knowing the name."""
    common = {"num_train_timesteps": spec.num_timesteps, "prediction_type": spec.prediction_type}
    if spec.beta_schedule == "cosine_clipped":
        return DDPMScheduler(trained_betas=clipped_cosine_betas(spec.num_timesteps).tolist(), **common)
    return DDPMScheduler(beta_schedule=spec.beta_schedule, **common)


def train(
    spec: TrainSpec,
    dataset: ImageDataset,
    out_dir: str | Path,
    *,
    on_epoch: ProgressCallback | None = None,
) -> TrainingRun:
    """Train a DDPM on `dataset` as `spec` says; write the run folder; return it loaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, (channels, resolution) = len(dataset), dataset.images.shape[1:3]
    conditions, num_classes = _class_conditions(spec, dataset)
    scheduler = noise_scheduler(spec)
    scheduler.save_pretrained(out / "scheduler")
    model = DiffusionModel.from_parts(
        build_unet(
            spec.preset,
            resolution=resolution,
            channels=channels,
            seed=spec.seed,
            num_class_embeds=num_classes,
        ),
        scheduler,
    )
    model.unet.train()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=spec.lr)
    generator = torch.Generator("cpu").manual_seed(spec.seed)

    timesteps = torch.empty(spec.epochs, n, dtype=torch.int64)
    seeds = torch.empty(spec.epochs, n, dtype=torch.int64)
    losses = torch.empty(spec.epochs, n, dtype=torch.float32)
    checkpoints = []
    for epoch in range(spec.epochs):
        # 1. Draw this epoch's order, timesteps and noise seeds from the run's one generator.
        order = torch.randperm(n, generator=generator)
        timesteps[epoch] = torch.randint(0, spec.num_timesteps, (n,), generator=generator)
        seeds[epoch] = draw_seeds(generator, n)
        # 2. One optimiser step per batch, the last one possibly smaller.
        for start in range(0, n, spec.batch_size):
            rows = order[start : start + spec.batch_size]
            losses[epoch, rows] = _step(
                model, optimizer, spec, dataset.images[rows], timesteps[epoch, rows], seeds[epoch, rows],
                conditions.select(rows),
            )
        # 3. Save a checkpoint every `save_every` epochs and after the last.
        done = epoch + 1
        if done % spec.save_every == 0 or done == spec.epochs:
            folder = f"checkpoints/epoch-{done:04d}"
            model.unet.save_pretrained(out / folder, safe_serialization=True)
            checkpoints.append({"epoch": done, "path": folder, "lr": spec.lr})
        if on_epoch is not None:
            on_epoch(done, float(losses[epoch].mean()))

    record = {"timesteps": timesteps, "seeds": seeds, "losses": losses}
    labelled: dict[str, Any] = {"labels": dataset.labels, "classes": dataset.classes} if conditions else {}
    write_run(out, spec, dataset.ids, dataset.fingerprint, checkpoints, record, **labelled)
    return TrainingRun.load(out)


def _class_conditions(spec: TrainSpec, dataset: ImageDataset) -> tuple[Conditions, int | None]:
    """Every sample's class label as conditions, and the UNet's `num_class_embeds` (the largest class
    integer + 1), for a class-conditional run; none and None otherwise."""
    if not spec.class_conditional:
        return Conditions(), None
    if dataset.labels is None or dataset.classes is None:
        raise SpecError(
            f"a class-conditional run needs class labels, and {dataset.name!r} has none: put each class's "
            "images in a subfolder (train/<class>/...), or give 'labels' in the .npz"
        )
    return Conditions.of_labels(dataset.labels), max(dataset.classes.classes.values()) + 1


def _step(
    model: DiffusionModel,
    optimizer: torch.optim.Optimizer,
    spec: TrainSpec,
    images: torch.Tensor,
    timesteps: torch.Tensor,
    seeds: torch.Tensor,
    conditions: Conditions,
) -> torch.Tensor:
    """One optimiser step on a batch under its conditions; returns the per-sample losses `(B,)` it trained
    on."""
    noise = noise_from_seeds(seeds, images.shape[1:])
    noisy = noised(images, timesteps, noise, model.scheduler)
    prediction = model.unet(noisy, timesteps, **conditions.tensors).sample
    per_sample = per_sample_loss(
        prediction, images, timesteps, noise, model.scheduler, spec.loss, spec.loss_weighting
    )
    optimizer.zero_grad(set_to_none=True)
    per_sample.mean().backward()
    optimizer.step()
    return per_sample.detach()
