"""The outlier-model experiment (method.md section 6), end to end on built-in data.

Steps of `run_experiment`: build a training set of a majority group plus a small planted group of
outliers (written as an .npz, so the index names it like any other source); train a DDPM with the
replay record; index every sample in memory at every checkpoint (the replayed training step plus a
timestep grid); query with held-out images, training images and images the last checkpoint
generates; score with TracIn and ReTrac; evaluate; write `report.json`, `report.md` and PNG figures.

Scores use the replayed slot only (TracIn proper: the step that actually trained the sample). The
grid slots serve the two analyses that need a sample's gradient away from its training step:
self-influence (its query side is the mean over the grid, M = 1) and the norm-vs-timestep curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from api_schemas import (
    DatasetSpec,
    IndexSpec,
    LossKind,
    Method,
    ProjectorSpec,
    QuerySpec,
    SlotSpec,
    TrainSpec,
)
from retrac import viz
from retrac.attribution import Attributor
from retrac.datasets import ImageDataset, load_dataset, outlier_mixture, split_holdout
from retrac.evaluation import metrics
from retrac.evaluation.norms import norm_curves, norm_timestep_statistics, write_norm_figures
from retrac.evaluation.report import (
    GenerallyInfluential,
    InfluentialSample,
    MethodMetrics,
    NormTimestepStatistics,
    QueryInfo,
    QueryKind,
    Report,
    SelfRank,
    Setup,
    write_report,
)
from retrac.evaluation.sampling import SamplerKind, generate
from retrac.exceptions import EvaluationError
from retrac.gradients import num_parameters
from retrac.models import load_scheduler
from retrac.plan import IndexPlan, Rows
from retrac.query_side import QueryVectors
from retrac.scoring import METHODS, RowChunk, contributions, self_influence, self_influence_slots
from retrac.training import train

MAJORITY, OUTLIER, GENERATED = "majority", "outlier", "generated"
GALLERY_QUERIES = {MAJORITY: 4, OUTLIER: 2, GENERATED: 2}
"""How many queries of each group the gallery shows (held-out ones for the two training groups)."""
GALLERY_K = 6
"""Proponents shown per query and method, as in the paper's figure (top-6 of 4 airplane queries)."""


class QueryCounts(BaseModel):
    """How many queries of each kind: held-out and training images of each group, and generated ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    heldout_majority: int = Field(16, ge=1)
    heldout_outliers: int = Field(8, ge=1)
    train_majority: int = Field(8, ge=1)
    train_outliers: int = Field(4, ge=0)
    generated: int = Field(8, ge=0)


class ExperimentConfig(BaseModel):
    """An outlier-model experiment. The defaults are the README's experiment (`paper()`).

    The setup, fixed before any result was seen (the paper used 5,000 CIFAR-10 airplanes plus 200
    MNIST zeros at 32 px, i.e. 3.85% outliers):

    - majority: 1,000 random 32 px patches of scikit-image's bundled photos, brought to 16x16 grey
      (`builtin:patches`); planted outliers: 40 digit zeros of scikit-learn's digits, upscaled to
      16x16 (`builtin:digits:0`); 40 / 1,040 = 3.85%, the paper's ratio. Held-out queries are other
      patches and other zeros; the split and the mixture are seeded.
    - model: the `tiny` UNet preset (~0.7M parameters), MSE loss, 30 epochs, batch 32, AdamW at lr
      1e-3, a checkpoint every 10 epochs (3 checkpoints), replay recorded.
    - index: the replayed step plus 6 grid slots per sample and checkpoint, count-sketch projection
      to k = 4,096 (norms are exact; the identity projector would need 2.8 MB per row).
    - queries: 16 + 8 held-out patches and zeros, 8 + 4 training patches and zeros, 8 images the
      last checkpoint generates (DDPM, all 1,000 steps, seed 0); K = 20 timesteps, M = 4 draws.
    - metrics at k = 10; a sample is generally influential when it is in the top-10 of at least a
      quarter of the queries.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    majority: str = Field("builtin:patches", description="dataset source of the majority group")
    outliers: str = Field("builtin:digits:0", description="dataset source of the planted group")
    n_majority: int = Field(1000, ge=1)
    n_outliers: int = Field(40, ge=1)
    resolution: int = Field(16, ge=4)
    channels: Literal[1, 3] = 1
    preset: str = Field("tiny", description="UNet preset: micro, tiny or small")
    loss: LossKind = "mse"
    epochs: int = Field(30, ge=1)
    save_every: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    grid_slots: int = Field(6, ge=2, description="grid slots per sample: self-influence's query side")
    projector: ProjectorSpec = ProjectorSpec(kind="sketch", dim=4096, seed=0)
    queries: QueryCounts = QueryCounts()
    query: QuerySpec = QuerySpec(timesteps=20, draws=4, seed=0)
    sampler: SamplerKind = "ddpm"
    sampler_steps: int | None = Field(None, ge=1, description="denoising steps; default: the sampler's")
    top_k: int = Field(10, ge=1)
    influential_share: float = Field(
        0.25, gt=0, le=1, description="of the queries, for 'generally influential'"
    )
    curve_timesteps: int = Field(100, ge=3, description="grid of the norm curve")
    curve_samples: int = Field(8, ge=1, description="training samples whose norm curve is averaged")
    seed: int = Field(0, ge=0)

    @classmethod
    def paper(cls) -> ExperimentConfig:
        """The README's experiment: about 15 minutes on 2 CPU cores."""
        return cls()

    @classmethod
    def small(cls) -> ExperimentConfig:
        """Same design, smaller: 400 patches + 16 zeros, 20 epochs, 2 checkpoints; minutes on 2 cores."""
        return cls(
            n_majority=400,
            n_outliers=16,
            epochs=20,
            grid_slots=4,
            queries=QueryCounts(
                heldout_majority=8, heldout_outliers=4, train_majority=4, train_outliers=2, generated=4
            ),
            query=QuerySpec(timesteps=10, draws=2, seed=0),
            sampler="ddim",
            sampler_steps=50,
            curve_timesteps=50,
            curve_samples=4,
        )

    @classmethod
    def smoke(cls) -> ExperimentConfig:
        """A check that everything runs: micro model at 8 px, exact (identity) projection, seconds."""
        return cls(
            n_majority=40,
            n_outliers=4,
            resolution=8,
            preset="micro",
            epochs=4,
            save_every=2,
            batch_size=16,
            lr=2e-3,
            grid_slots=2,
            projector=ProjectorSpec(kind="identity"),
            queries=QueryCounts(
                heldout_majority=3, heldout_outliers=2, train_majority=2, train_outliers=1, generated=2
            ),
            query=QuerySpec(timesteps=4, draws=2, seed=0),
            sampler="ddim",
            sampler_steps=5,
            top_k=3,
            curve_timesteps=8,
            curve_samples=2,
        )


PRESETS = {"smoke": ExperimentConfig.smoke, "small": ExperimentConfig.small, "paper": ExperimentConfig.paper}


@dataclass(frozen=True)
class ExperimentData:
    """The training mixture and the query images with their kind, group and (for training images) row."""

    train: ImageDataset
    source: Path
    queries: ImageDataset
    kinds: tuple[QueryKind, ...]
    own_rows: tuple[int | None, ...]

    def with_generated(self, images: torch.Tensor) -> ExperimentData:
        """The same, with `images` appended as generated queries."""
        count = images.shape[0]
        if count == 0:
            return self
        ids = tuple(f"generated-{i:03d}" for i in range(count))
        queries = ImageDataset(
            torch.cat([self.queries.images, images]),
            self.queries.ids + ids,
            "queries",
            (self.queries.groups or ()) + (GENERATED,) * count,
        )
        return ExperimentData(
            self.train,
            self.source,
            queries,
            self.kinds + ("generated",) * count,  # type: ignore[operator]  # a repeated literal reads as str
            self.own_rows + (None,) * count,
        )


def build_data(config: ExperimentConfig, folder: str | Path) -> ExperimentData:
    """The training mixture (saved as `folder/train.npz`) and the held-out and training-image queries."""
    shape: dict[str, Any] = {"resolution": config.resolution, "channels": config.channels}
    counts = config.queries
    majority = load_dataset(
        DatasetSpec(
            source=config.majority,
            limit=config.n_majority + counts.heldout_majority,
            seed=config.seed,
            **shape,
        )
    )
    outliers = load_dataset(DatasetSpec(source=config.outliers, seed=config.seed, **shape))
    majority_train, majority_held = split_holdout(majority, counts.heldout_majority, seed=config.seed)
    outliers_train, outliers_held = split_holdout(outliers, counts.heldout_outliers, seed=config.seed)
    mixture = outlier_mixture(
        majority_train,
        outliers_train,
        n_majority=config.n_majority,
        n_outliers=config.n_outliers,
        seed=config.seed,
    )
    source = save_npz(mixture, Path(folder).resolve() / "train.npz")
    training = load_dataset(DatasetSpec(source=str(source), **shape))

    rng = np.random.default_rng(config.seed)
    picked = []
    for group, count in ((MAJORITY, counts.train_majority), (OUTLIER, counts.train_outliers)):
        members = [i for i, g in enumerate(training.groups or ()) if g == group]
        if count > len(members):
            raise EvaluationError(
                f"cannot pick {count} training queries of group {group!r} from {len(members)}"
            )
        picked += sorted(rng.choice(members, size=count, replace=False).tolist())
    parts: list[tuple[ImageDataset, str | None, QueryKind]] = [
        (majority_held, MAJORITY, "heldout"),
        (outliers_held, OUTLIER, "heldout"),
        (training.subset(picked), None, "train"),
    ]
    images = torch.cat([p.images for p, _, _ in parts])
    ids = tuple(f"{kind}-{i}" for part, _, kind in parts for i in part.ids)
    groups = tuple(
        group or training.groups[picked[j]]  # type: ignore[index]
        for part, group, _ in parts
        for j in range(len(part))
    )
    kinds: tuple[QueryKind, ...] = tuple(kind for part, _, kind in parts for _ in range(len(part)))
    own_rows = (None,) * (len(majority_held) + len(outliers_held)) + tuple(picked)
    return ExperimentData(training, source, ImageDataset(images, ids, "queries", groups), kinds, own_rows)


def replay_scores(
    rows: Sequence[Rows], queries: Sequence[QueryVectors], weights: Sequence[float]
) -> dict[Method, np.ndarray]:
    """Full score matrices `(Q, N)` per method, from each sample's replayed slot (slot 0) alone."""
    replayed = [RowChunk(r.projected[:, :1], r.norms[:, :1]) for r in rows]
    table = contributions(replayed, queries, weights, METHODS)
    return {method: table[method].sum(dim=-1).T.numpy() for method in METHODS}


def method_metrics(
    scores: np.ndarray,
    self_scores: np.ndarray,
    data: ExperimentData,
    replay: Rows,
    *,
    top_k: int,
    influential_share: float,
) -> MethodMetrics:
    """Every metric of one method from its score matrix `(Q, N)` and self-influences `(N,)`.

    `replay` is the last checkpoint's rows: the training step that names each generally influential
    sample's timestep and norm.
    """
    ranking = metrics.top_k(scores, top_k)
    train_groups = data.train.groups or ()
    query_groups = data.queries.groups or ()
    kinds = np.asarray(data.kinds)
    heldout = np.flatnonzero(kinds == "heldout")
    trained = np.flatnonzero(kinds == "train")

    min_queries = max(2, math.ceil(influential_share * len(kinds)))
    found = metrics.generally_influential(ranking, min_queries)
    samples = [
        InfluentialSample(
            id=data.train.ids[row],
            group=train_groups[row] if train_groups else None,
            queries=count,
            timestep=int(replay.timesteps[row, 0]),
            norm=float(replay.norms[row, 0]),
        )
        for row, count in found
    ]
    ranks = metrics.self_ranks(scores[trained], [data.own_rows[q] for q in trained])  # type: ignore[misc]
    is_outlier = np.asarray(train_groups) == OUTLIER
    heldout_groups = [query_groups[q] for q in heldout]
    return MethodMetrics(
        u_at_k=metrics.u_at_k(ranking),
        generally_influential=GenerallyInfluential(
            min_queries=min_queries,
            count=len(found),
            share=metrics.pooled_share(ranking, [row for row, _ in found]),
            samples=samples,
        ),
        precision_at_k=metrics.precision_at_k(ranking[heldout], heldout_groups, train_groups),
        outlier_intrusion=metrics.intrusion(
            ranking[heldout], heldout_groups, train_groups, into=MAJORITY, intruder=OUTLIER
        ),
        query_self_rank=SelfRank(
            mean=float(ranks.mean()), top1=float((ranks == 1).mean()), ranks=[int(r) for r in ranks]
        ),
        self_influence_recall=metrics.recall_at_count(self_scores, is_outlier),
        self_influence_auc=metrics.roc_auc(self_scores, is_outlier),
    )


def run_experiment(config: ExperimentConfig, out_dir: str | Path, progress: bool = True) -> Report:
    """Run the whole experiment into `out_dir` (data/, run/, report.json, report.md, *.png).

    Its phases, in order, each timed: data, train, index, sample (generated queries), query, evaluate,
    figures.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    with clock("data"):
        data = build_data(config, out / "data")
    dataset_spec = DatasetSpec(
        source=str(data.source), resolution=config.resolution, channels=config.channels
    )
    with clock("train"):
        train_run(config, dataset_spec, data, out / "run", progress)
    with clock("index"):
        attributor = index_run(config, dataset_spec, out / "run", progress)
    with clock("sample"):
        data = with_generated_queries(config, data, attributor, progress)
    with clock("query"):
        scores, self_scores = score_queries(config, data, attributor, progress)
    with clock("evaluate"):
        norm = last_checkpoint_norms(config, data, attributor)
        evaluated = {
            m: method_metrics(
                scores[m], self_scores[m], data, _last_rows(attributor),
                top_k=config.top_k, influential_share=config.influential_share,
            )
            for m in METHODS
        }
    with clock("figures"):
        figures = _figures(out, data, scores, _last_rows(attributor), norm.statistics, norm.curves)
    report = Report(
        config=config.model_dump(mode="json"),
        setup=_setup(attributor.plan, data, num_parameters(attributor.model(0))),
        top_k=config.top_k,
        queries=[
            QueryInfo(id=i, kind=k, group=g)
            for i, k, g in zip(data.queries.ids, data.kinds, data.queries.groups or (), strict=True)
        ],
        tracin=evaluated["tracin"],
        retrac=evaluated["retrac"],
        norm_timestep=norm.statistics,
        timings=clock.seconds | {"total": clock.total()},
        figures=figures,
    )
    write_report(report, out)
    return report


def train_run(
    config: ExperimentConfig, dataset: DatasetSpec, data: ExperimentData, folder: Path, progress: bool
) -> None:
    """Train on the mixture into `folder`, recording every sample's timestep and noise seed per epoch."""
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
    with tqdm(total=config.epochs, desc="train", unit="epoch", disable=not progress) as bar:

        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        train(spec, data.train, folder, on_epoch=on_epoch)


def index_run(config: ExperimentConfig, dataset: DatasetSpec, run: Path, progress: bool) -> Attributor:
    """Every sample at every checkpoint, in memory: the replayed step plus `config.grid_slots` grid slots."""
    slots = SlotSpec(replay=True, grid=config.grid_slots, seed=config.seed)
    plan = IndexPlan.resolve(
        IndexSpec(dataset=dataset, run=str(run), slots=slots, projector=config.projector)
    )
    attributor = Attributor(plan)
    total = plan.num_rows * len(plan.checkpoints)
    with tqdm(total=total, desc="index", unit="row", disable=not progress) as bar:
        attributor.index(on_progress=bar.update)
    return attributor


def with_generated_queries(
    config: ExperimentConfig, data: ExperimentData, attributor: Attributor, progress: bool
) -> ExperimentData:
    """`data` with `config.queries.generated` images sampled from the last checkpoint added as queries."""
    if not config.queries.generated:
        return data
    images = generate(
        attributor.model(len(attributor.plan.checkpoints) - 1).unet,
        load_scheduler(attributor.plan.scheduler_folder),
        config.queries.generated,
        sampler=config.sampler,
        steps=config.sampler_steps,
        seed=config.seed,
        progress=progress,
    )
    return data.with_generated(images)


def score_queries(
    config: ExperimentConfig, data: ExperimentData, attributor: Attributor, progress: bool
) -> tuple[dict[Method, np.ndarray], dict[Method, np.ndarray]]:
    """Full score matrices `(Q, N)` per method from the replayed slot, and self-influence `(N,)` from the
    stored slots (`retrac.scoring.self_influence_slots`)."""
    plan, rows = attributor.plan, attributor.source().rows
    vectors = [
        attributor.query_vectors(data.queries.images, config.query, [c])[0]
        for c in tqdm(range(len(plan.checkpoints)), desc="query", unit="checkpoint", disable=not progress)
    ]
    scores = replay_scores(rows, vectors, plan.weights)
    self_scores = self_influence(rows, plan.weights, *self_influence_slots(plan.spec.slots.kinds))
    return scores, {m: v.numpy() for m, v in self_scores.items()}


@dataclass(frozen=True)
class LastCheckpointNorms:
    """Norm vs timestep at the last checkpoint: the statistics and the curves `(n, K)` they came from."""

    statistics: NormTimestepStatistics
    curves: np.ndarray


def last_checkpoint_norms(
    config: ExperimentConfig, data: ExperimentData, attributor: Attributor
) -> LastCheckpointNorms:
    """Replayed (timestep, norm) of every sample at the last checkpoint, and a few samples' grid curves."""
    plan = attributor.plan
    last = len(plan.checkpoints) - 1
    rows = _last_rows(attributor)
    computer = plan.gradient_computer(last, attributor.model(last))
    curve_images = data.train.images[: config.curve_samples]
    grid, curves = norm_curves(computer, curve_images, config.curve_timesteps, seed=config.seed)
    statistics = norm_timestep_statistics(
        rows.timesteps[:, 0].numpy(),
        rows.norms[:, 0].numpy(),
        grid,
        curves,
        num_timesteps=plan.num_timesteps,
        checkpoint_epoch=int(plan.checkpoints[last].epoch or 0),
    )
    return LastCheckpointNorms(statistics, curves)


def _last_rows(attributor: Attributor) -> Rows:
    """The last checkpoint's rows: the training steps that name a sample's timestep and norm."""
    return attributor.source().rows[-1]


def _figures(
    out: Path,
    data: ExperimentData,
    scores: dict[Method, np.ndarray],
    replay: Rows,
    norm: NormTimestepStatistics,
    curves: np.ndarray,
) -> list[str]:
    """Gallery (TracIn vs ReTrac top proponents), norm scatter and norm curve, as PNGs in `out`."""
    groups = np.asarray(data.queries.groups or ())
    chosen = [
        q
        for group, count in GALLERY_QUERIES.items()
        for q in [i for i in range(len(groups)) if groups[i] == group and data.kinds[i] != "train"][:count]
    ]
    k = min(GALLERY_K, scores["tracin"].shape[1])
    rankings = {}
    method: Method
    for method, label in (("tracin", "TracIn"), ("retrac", "ReTrac")):
        positions = metrics.top_k(scores[method][chosen], k)
        rankings[label] = (positions, np.take_along_axis(scores[method][chosen], positions, axis=1))
    labels = [f"{data.kinds[q]} {groups[q]}" if data.kinds[q] != "generated" else "generated" for q in chosen]
    viz.gallery(out / "gallery.png", data.queries.subset(chosen), rankings, data.train, query_labels=labels)
    first = f"{data.train.ids[0]} ({(data.train.groups or ('',))[0]})"
    return [
        "gallery.png",
        *write_norm_figures(
            out,
            replay.timesteps[:, 0].numpy(),
            replay.norms[:, 0].numpy(),
            data.train.groups,
            norm,
            curves,
            first,
        ),
    ]


def _setup(plan: IndexPlan, data: ExperimentData, parameters: int) -> Setup:
    spec = plan.spec
    groups = data.train.groups or ()
    projector = (
        "identity (exact)"
        if spec.projector.kind == "identity"
        else f"{spec.projector.kind} k={spec.projector.dim}"
    )
    return Setup(
        train_samples=len(data.train),
        group_sizes={g: groups.count(g) for g in sorted(set(groups))},
        checkpoint_epochs=[int(c.epoch or 0) for c in plan.checkpoints],
        checkpoint_weights=plan.weights,
        parameters=parameters,
        projector=projector,
        slots=f"replayed step + {spec.slots.grid} grid slots",
    )


def save_npz(dataset: ImageDataset, path: Path) -> Path:
    """Images in [0, 1] with their ids and groups (if any): a source `load_dataset` reads back as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[str, Any] = {} if dataset.groups is None else {"groups": np.asarray(dataset.groups)}
    np.savez(
        path, images=((dataset.images + 1) / 2).clamp(0, 1).numpy(), ids=np.asarray(dataset.ids), **groups
    )
    return path


class Clock:
    """Seconds spent per named phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - began, 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)
