"""Models retrained on subsets of a training set, and the query losses they give: the ground truth of
counterfactual evaluation (`retrac.evaluation.lds`).

A `RetrainJob` names the samples to keep; `retrain_all` trains every job in its own worker process
(one torch thread each, so jobs on a many-core machine do not contend) and returns each job's query
losses, `(len(jobs), Q)`. The loss of a query is the mean over the grid `floor(linspace(1, T-1, K))`
and M draws of the per-sample training loss, with the measurement's own seeded noise (`RetrainJob.
measure`), so every model is judged on the same noise.

With a `cache` folder, each model is kept as `cache/<model key>/` (its last checkpoint `unet/` and
`scheduler/`) and its losses as `losses-<losses key>.npy` inside it, each written under a temporary
name and renamed into place when complete: a run killed at any point resumes with every finished
model and loss, and a half-written one is never read. The model key is a digest of the TrainSpec
(less the data file's path), the training data's fingerprint and the kept positions; the losses key
adds the measurement and the query images. One run at a time per cache folder (leftover
`.partial-*` entries are removed on start).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

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
PARTIAL = ".partial-"
"""Prefix of cache entries still being written."""


@dataclass(frozen=True)
class RetrainJob:
    """Train `spec` on the samples of `dataset` at `keep`, then measure the loss of each of `queries`
    `(Q, C, H, W)` under `measure` (K, M and seed of the loss's timesteps and noise)."""

    spec: TrainSpec
    dataset: ImageDataset
    keep: tuple[int, ...]
    queries: torch.Tensor
    measure: QuerySpec

    @cached_property
    def model_key(self) -> str:
        """Digest of what the trained model depends on: spec, data and kept positions (not where the
        data file lies: a moved cache folder keeps its models)."""
        spec = self.spec.model_dump(mode="json")
        del spec["dataset"]["source"]
        header = json.dumps([spec, self.dataset.fingerprint, list(self.keep)])
        return hashlib.sha256(header.encode()).hexdigest()[:24]

    @cached_property
    def losses_key(self) -> str:
        """Digest of what the losses depend on beyond the model: the measurement and the query images."""
        digest = hashlib.sha256(self.measure.model_dump_json().encode())
        digest.update(json.dumps(list(self.queries.shape)).encode())
        digest.update(np.ascontiguousarray(self.queries.numpy(), dtype=np.float32).tobytes())
        return digest.hexdigest()[:24]


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


def train_and_measure(job: RetrainJob, cache: Path | None = None) -> np.ndarray:
    """Train one job's model (or take it from `cache`) and return its query losses `(Q,)`, caching both."""
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="retrac-retrain-") as scratch:
            return query_losses(_trained(job, Path(scratch)), job.spec.loss, job.queries, job.measure)
    found = cached_losses(job, cache)
    if found is not None:
        return found
    folder = cache / job.model_key
    if not folder.is_dir():
        partial = cache / f"{PARTIAL}{job.model_key}-{os.getpid()}"
        _trained(job, partial)
        shutil.rmtree(partial / "run")
        try:
            os.replace(partial, folder)
        except OSError:  # another worker finished the same model first: the same bytes
            shutil.rmtree(partial)
    model = DiffusionModel.from_parts(load_unet(folder / "unet"), load_scheduler(folder / "scheduler"))
    losses = query_losses(model, job.spec.loss, job.queries, job.measure)
    partial_file = cache / f"{PARTIAL}{job.model_key}-{job.losses_key}-{os.getpid()}.npy"
    np.save(partial_file, losses)
    os.replace(partial_file, _losses_file(job, cache))
    return losses


def cached_losses(job: RetrainJob, cache: Path) -> np.ndarray | None:
    """The job's losses `(Q,)` if `cache` holds them, else None."""
    file = _losses_file(job, cache)
    return np.load(file, allow_pickle=False) if file.is_file() else None


def _losses_file(job: RetrainJob, cache: Path) -> Path:
    return cache / job.model_key / f"losses-{job.losses_key}.npy"


def _trained(job: RetrainJob, folder: Path) -> DiffusionModel:
    """Train the job's model into `folder/run`; copy its last checkpoint to `folder/unet` and its
    scheduler to `folder/scheduler`; return it loaded."""
    run = train(job.spec, job.dataset.subset(job.keep), folder / "run")
    shutil.copytree(run.checkpoints()[-1].path, folder / "unet")
    shutil.copytree(run.scheduler_folder, folder / "scheduler")
    return DiffusionModel.from_parts(load_unet(folder / "unet"), load_scheduler(folder / "scheduler"))


def retrain_all(
    jobs: Sequence[RetrainJob],
    *,
    workers: int,
    on_done: Callable[[int], object] | None = None,
    cache: Path | None = None,
) -> np.ndarray:
    """`(len(jobs), Q)` query losses, one row per job in order, trained in `workers` processes; with
    `cache`, jobs whose losses it holds are not run (module docstring).

    Processes are spawned (not forked), each with one torch thread: a forked child would inherit the
    parent's thread pools, and more threads than cores slow every job down.
    """
    rows: dict[int, np.ndarray] = {}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for leftover in cache.glob(f"{PARTIAL}*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        for i, job in enumerate(jobs):
            found = cached_losses(job, cache)
            if found is not None:
                rows[i] = found
        if rows and on_done is not None:
            on_done(len(rows))
    pending = [i for i in range(len(jobs)) if i not in rows]
    if pending:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            futures = {pool.submit(train_and_measure, jobs[i], cache): i for i in pending}
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                if on_done is not None:
                    on_done(1)
    return np.stack([rows[i] for i in range(len(jobs))])
