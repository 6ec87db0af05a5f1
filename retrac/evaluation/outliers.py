"""Outlier detection by self-influence on mixtures with planted outliers (method.md section 6).

Two mixtures, each a majority plus about 4% planted outliers (the paper's ratio, 200 / 5,200):
`patches+zeros` (`builtin:outliers`, photo patches with planted digit zeros) and `digits+faces`
(scikit-learn's digits with planted LFW faces).

Outlier scores, higher meaning more suspect (`outlier_scores`; trak and dtrak in `detect_outliers`):
- `tracin`, `retrac`: self-influence as the paper defines it (`retrac.scoring.self_influence`: the
  replayed step against the mean over grid slots).
- `trak`, `dtrak` (`kernel_self_influence`): the same, preconditioned by the kernel, over loss rows
  and over output-norm rows.
- `relative_norm`: the mean over checkpoints (by weight) and grid slots of
  `log(||g(z, t)|| / median_n ||g(n, t)||)`: how large a sample's exact gradient is next to every
  other sample's at the same timestep. Dividing by the population at t removes the timestep's own
  scale, the bias ReTrac removes from scores, without discarding magnitude, which self-influence needs.
- `atypical_direction`: minus the mean over checkpoints (by weight) and grid slots of
  `u(z, t) . mean_n u(n, t)`, `u = g / ||g||`: minus the mean cosine of a sample's gradient with every
  training sample's at the same slot, i.e. minus the matched ReTrac influence of the sample on the
  average training sample. A sample that training on helps the others least is unlike them.

Both compare samples slot by slot, so slots should share their noise across samples (`OutlierConfig.noise
= "shared"`): with a noise image of its own per sample and slot, most of a gradient is that noise's.

`detect_outliers` trains on one mixture, indexes it in memory (replayed step plus grid slots; loss and
output-norm rows) and reports each score's ROC AUC and recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from api_schemas import (
    DatasetSpec,
    IndexSpec,
    KernelSpec,
    LossKind,
    OutputFunction,
    ProjectorSpec,
    SlotNoise,
    SlotSpec,
    TrainSpec,
)
from api_schemas.diagnostics import OutlierScore
from retrac.attribution import Attributor
from retrac.datasets import ImageDataset, load_dataset, outlier_mixture
from retrac.evaluation import metrics
from retrac.evaluation.experiment import Clock, save_npz
from retrac.exceptions import SpecError
from retrac.gradients import inverse_norms
from retrac.kernels import Kernel
from retrac.plan import IndexPlan
from retrac.scoring import METHODS, RowChunk, self_influence, self_influence_slots
from retrac.training import train

MixName = Literal["patches+zeros", "digits+faces"]
MIXES: tuple[MixName, ...] = ("patches+zeros", "digits+faces")
OUTLIER_SHARE = 0.04
"""Planted outliers per training sample, as in `builtin:outliers`."""
OUTLIER = "outlier"
OUTLIER_SCORES: tuple[OutlierScore, ...] = get_args(OutlierScore)
"""Every outlier score `outlier_scores` gives, in order."""
KERNEL_SCORES: dict[OutputFunction, str] = {"loss": "trak", "output-norm": "dtrak"}
"""The kernel self-influence `detect_outliers` adds per row kind, when its config has a kernel."""


class OutlierConfig(BaseModel):
    """One outlier-detection run: the mixture, the model and its training, the index's slots."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mix: MixName = "patches+zeros"
    n_train: int = Field(400, ge=4)
    resolution: int = Field(8, ge=4)
    preset: str = "micro"
    loss: LossKind = "mse"
    epochs: int = Field(30, ge=1)
    save_every: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    grid: int = Field(8, ge=1, description="grid slots per sample: self-influence's query side")
    noise: SlotNoise = Field("shared", description="grid slots' noise: shared by all samples, or a seed each")
    projector: ProjectorSpec = ProjectorSpec(kind="sketch", dim=4096, seed=0)
    kernel: KernelSpec | None = Field(
        KernelSpec(), description="the TRAK kernel of trak's and dtrak's self-influence; none: not scored"
    )
    seed: int = Field(0, ge=0)


class OutlierResult(BaseModel):
    """How well self-influence finds the planted group, per method."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict
    samples: int
    outliers: int
    auc: dict[str, float] = Field(description="ROC AUC of the planted group under each outlier score")
    recall: dict[str, float] = Field(
        description="planted outliers among the |outliers| highest self-influences"
    )
    timings: dict[str, float]


def planted_mix(mix: MixName, n_train: int, resolution: int, seed: int) -> ImageDataset:
    """`n_train` images, about `OUTLIER_SHARE` of them planted outliers (group "outlier"), shuffled."""
    shape: dict[str, Any] = {"resolution": resolution, "channels": 1, "seed": seed}
    if mix == "patches+zeros":
        return load_dataset(DatasetSpec(source="builtin:outliers", limit=n_train, **shape))
    count = max(1, round(OUTLIER_SHARE * n_train))
    digits = load_dataset(DatasetSpec(source="builtin:digits", **shape))
    faces = load_dataset(DatasetSpec(source="builtin:faces", **shape))
    return outlier_mixture(digits, faces, n_majority=n_train - count, n_outliers=count, seed=seed)


def detect_outliers(config: OutlierConfig, out_dir: str | Path) -> OutlierResult:
    """Train on the mixture into `out_dir`, index it in memory and score self-influence (see module)."""
    out = Path(out_dir)
    clock = Clock()
    with clock("train"):
        data = planted_mix(config.mix, config.n_train, config.resolution, config.seed)
        dataset = DatasetSpec(
            source=str(save_npz(data, out.resolve() / "train.npz")), resolution=config.resolution
        )
        spec = TrainSpec(
            dataset=dataset,
            preset=config.preset,
            loss=config.loss,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            save_every=config.save_every,
            seed=config.seed,
        )
        train(spec, data, out / "run")
    slots = SlotSpec(replay=True, grid=config.grid, noise=config.noise, seed=config.seed)
    kinds: dict[OutputFunction, Attributor] = {}
    with clock("index"):
        for kind in ("loss", "output-norm") if config.kernel else ("loss",):
            index = IndexSpec(dataset=dataset, run=str(out / "run"), slots=slots, projector=config.projector,
                              output_function=kind, kernel=config.kernel)
            kinds[kind] = Attributor(IndexPlan.resolve(index))
            kinds[kind].index()
    with clock("score"):
        loss = kinds["loss"]
        scores = outlier_scores(loss.rows or [], loss.plan.weights, slots.kinds)
        for kind, attributor in kinds.items() if config.kernel else ():
            scores[KERNEL_SCORES[kind]] = kernel_self_influence(
                attributor.rows or [], attributor.plan.weights, slots.kinds, attributor.kernels or []
            )
        planted = [g == OUTLIER for g in data.groups or ()]
    return OutlierResult(
        config=config.model_dump(mode="json"),
        samples=len(data),
        outliers=sum(planted),
        auc={name: metrics.roc_auc(values, planted) for name, values in scores.items()},
        recall={name: metrics.recall_at_count(values, planted) for name, values in scores.items()},
        timings=clock.seconds | {"total": clock.total()},
    )


def relative_norms(
    norms: Sequence[torch.Tensor], weights: Sequence[float], slots: Sequence[int]
) -> np.ndarray:
    """`(N,)` the `relative_norm` score from exact norms `(N, S)` per checkpoint (see the module docstring).

    Weights are normalised to sum to one, so the score does not scale with the learning rate. A zero
    norm counts as the smallest positive float32 (its log stays finite and ranks it lowest).
    """
    total = float(sum(weights))
    if not slots or total <= 0:
        raise SpecError("the relative-norm score needs grid slots and checkpoints of positive weight")
    tiny = torch.finfo(torch.float32).tiny
    score = torch.zeros(norms[0].shape[0], dtype=torch.float64)
    for per_slot, weight in zip(norms, weights, strict=True):
        logs = per_slot[:, list(slots)].double().clamp_min(tiny).log()
        score += weight / total * (logs - logs.median(dim=0).values).mean(dim=1)
    return score.numpy()


def atypical_directions(
    chunks: Sequence[RowChunk], weights: Sequence[float], slots: Sequence[int]
) -> np.ndarray:
    """`(N,)` the `atypical_direction` score from every row of each checkpoint (see the module docstring)."""
    return streamed_atypical_directions(lambda: [chunks], weights, slots)


def streamed_atypical_directions(
    passes: Callable[[], Iterable[Sequence[RowChunk]]], weights: Sequence[float], slots: Sequence[int]
) -> np.ndarray:
    """`(N,)` the `atypical_direction` score in two passes over rows read chunk by chunk.

    `passes()` yields the rows once per call, as one `RowChunk` per checkpoint for each run of rows:
    the first pass sums the unit vectors `u(n, t)` (their mean needs every row), the second scores
    each row against that mean, so a store larger than memory is scored in a chunk's memory. Weights
    are normalised to sum to one, as in `relative_norms`; a zero gradient (no direction) scores 0.
    """
    total = float(sum(weights))
    if not slots or total <= 0:
        raise SpecError("the atypical-direction score needs grid slots and checkpoints of positive weight")
    chosen = list(slots)
    sums: list[torch.Tensor] | None = None
    count = 0
    for per_checkpoint in passes():
        part = [_units(chunk, chosen).sum(dim=0) for chunk in per_checkpoint]
        sums = part if sums is None else [a + b for a, b in zip(sums, part, strict=True)]
        count += per_checkpoint[0].projected.shape[0]
    if sums is None:
        raise SpecError("the atypical-direction score needs at least one row")
    means = [s / count for s in sums]  # (S', k) per checkpoint: mean_n u(n, t)
    scores = []
    for per_checkpoint in passes():
        score = torch.zeros(per_checkpoint[0].projected.shape[0], dtype=torch.float64)
        for chunk, weight, mean in zip(per_checkpoint, weights, means, strict=True):
            alignment = (_units(chunk, chosen) * mean).sum(dim=-1)  # (n, S'): u(z, t) . mean_n u(n, t)
            score -= weight / total * alignment.mean(dim=1)
        scores.append(score)
    return torch.cat(scores).numpy()


def _units(chunk: RowChunk, slots: list[int]) -> torch.Tensor:
    """`(n, S', k)` float64 unit vectors `g / ||g||` of the slots `slots` (zero for a zero gradient)."""
    inverse = inverse_norms(chunk.norms[:, slots]).double()
    return chunk.projected[:, slots].double() * inverse.unsqueeze(-1)


def kernel_self_influence(
    chunks: Sequence[RowChunk], weights: Sequence[float], slot_kinds: Sequence[str], kernels: Sequence[Kernel]
) -> np.ndarray:
    """`(N,)` TRAK's self-influence `sum_c w_c phi_c(z)^T F_c^{-1} psi_c(z)`: the training side (the
    replayed step) against the query side (mean over grid slots) preconditioned by each checkpoint's
    kernel, as trak and dtrak score a query (`retrac.scoring.self_influence_slots` picks the slots)."""
    train_slots, query_slots = self_influence_slots(slot_kinds)
    total = torch.zeros(chunks[0].projected.shape[0], dtype=torch.float64)
    for chunk, weight, kernel in zip(chunks, weights, kernels, strict=True):
        train = chunk.projected[:, train_slots].double().mean(dim=1)
        query = kernel.precondition(chunk.projected[:, query_slots].float().mean(dim=1)).double()
        total += weight * (train * query).sum(dim=1)
    return total.numpy()


def outlier_scores(
    chunks: Sequence[RowChunk], weights: Sequence[float], slot_kinds: Sequence[str]
) -> dict[str, np.ndarray]:
    """Every score of `OUTLIER_SCORES`, `(N,)` each, from every row of every checkpoint."""
    train_slots, query_slots = self_influence_slots(slot_kinds)
    influence = self_influence(chunks, weights, train_slots, query_slots)
    scores = {m: influence[m].numpy() for m in METHODS}
    return scores | {
        "relative_norm": relative_norms([c.norms for c in chunks], weights, query_slots),
        "atypical_direction": atypical_directions(chunks, weights, query_slots),
    }
