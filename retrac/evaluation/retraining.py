"""Models retrained on subsets of a training set, and the query losses they give: the ground truth of
counterfactual evaluation (`retrac.evaluation.lds`).

A `RetrainJob` names the samples to keep; `retrain_all` trains every job in its own worker process
(one torch thread each, so jobs on a many-core machine do not contend) and returns each job's query
losses. The loss of a query is what the query-side estimator differentiates (method.md section 3):
the mean over the grid `floor(linspace(1, T-1, K))` and M draws of the per-sample training loss, with
the query's own seeded noise, so every model is judged on the same noise.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from api_schemas import LossKind, QuerySpec, TrainSpec
from retrac.datasets import ImageDataset
from retrac.losses import distance, noised, target
from retrac.models import DiffusionModel, load_scheduler, load_unet
from retrac.noise import query_noise
from retrac.query_side import query_timesteps
from retrac.training import train

LOSS_BATCH = 256
"""Noised images per forward pass when measuring query losses: bounds memory, not the result."""


@dataclass(frozen=True)
class RetrainJob:
    """Train `spec` on the samples of `dataset` at `keep`, then measure the loss of each of `queries`."""

    spec: TrainSpec
    dataset: ImageDataset
    keep: tuple[int, ...]
    queries: torch.Tensor
    query: QuerySpec


def random_subsets(count: int, size: int, population: int, seed: int) -> np.ndarray:
    """`(count, population)` boolean masks, mask m of `size` samples drawn from `default_rng([seed, m])`.

    Each mask depends only on (seed, m), so adding models keeps the earlier ones.
    """
    masks = np.zeros((count, population), dtype=bool)
    for m in range(count):
        masks[m, np.random.default_rng([seed, m]).choice(population, size=size, replace=False)] = True
    return masks


def query_losses(model: DiffusionModel, loss: LossKind, images: torch.Tensor, query: QuerySpec) -> np.ndarray:
    """`(Q,)` loss of each of `images` `(Q, C, H, W)`: the mean over the K-grid and M draws, float64."""
    steps = query_timesteps(query.timesteps, model.num_timesteps).repeat_interleave(query.draws)
    noise = query_noise(query.seed, query.timesteps, query.draws, images.shape[1:]).flatten(0, 1)
    losses = []
    with torch.no_grad():
        for image in images:
            per_draw = []
            for start in range(0, len(steps), LOSS_BATCH):
                t, eps = steps[start : start + LOSS_BATCH], noise[start : start + LOSS_BATCH]
                x0 = image.expand(len(t), *image.shape)
                prediction = model.unet(noised(x0, t, eps, model.scheduler), t).sample
                per_draw.append(distance(prediction, target(x0, t, eps, model.scheduler), loss).double())
            losses.append(float(torch.cat(per_draw).mean()))
    return np.asarray(losses)


def train_and_measure(job: RetrainJob) -> np.ndarray:
    """Train one job's model in a scratch folder and return its query losses `(Q,)`."""
    with tempfile.TemporaryDirectory(prefix="retrac-retrain-") as folder:
        run = train(job.spec, job.dataset.subset(job.keep), folder)
        last = run.checkpoints()[-1]
        model = DiffusionModel.from_parts(load_unet(last.path), load_scheduler(run.scheduler_folder))
        return query_losses(model, job.spec.loss, job.queries, job.query)


def retrain_all(
    jobs: Sequence[RetrainJob], *, workers: int, on_done: Callable[[int], object] | None = None
) -> np.ndarray:
    """`(len(jobs), Q)` query losses, one row per job in order, trained in `workers` processes.

    Processes are spawned (not forked), each with one torch thread: a forked child would inherit the
    parent's thread pools, and more threads than cores slow every job down.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        futures = [pool.submit(train_and_measure, job) for job in jobs]
        rows = []
        for future in futures:
            rows.append(future.result())
            if on_done is not None:
                on_done(1)
    return np.stack(rows)
