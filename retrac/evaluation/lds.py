"""Counterfactual validation of attributions: the linear datamodeling score (LDS) and the removal check.

Diversity metrics (U@k) say whether attributions differ between queries, not whether they are right.
LDS (Park et al., TRAK, 2023; Zheng et al., D-TRAK, 2024) asks the counterfactual question: train
models on random subsets of the training set and check whether summing a query's attributions over
each subset orders the subsets as the query's actual loss under those models does.

Steps of `run_lds`, each timed:

1. data: `n_train` training images and `n_queries` held-out query images from one source (seeded).
2. train: the full model, on every training image, with the replay record.
3. attribute: index it in memory; score every query against every training sample (full `(Q, N)`
   matrices) per method and per query estimator that `QuerySpec` offers (`query_estimators`).
4. retrain: `models` models on seeded random subsets of `subset_fraction` of the training set, and,
   for the first `removal_queries` queries, models without each one's top-`removal_k` proponents
   (per method and estimator) and without `removal_k` random samples; all in worker processes
   (`retrain_all`). Every model starts from the same seed: what differs between them is the data.
5. evaluate: LDS = the mean over queries of the Spearman correlation, over the subset models,
   between the actual loss and `-sum_{i in S} score(q, i)`, with a bootstrap interval over queries;
   removal = the change of each query's loss from the full model's.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
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
from retrac.attribution import Attributor
from retrac.datasets import ImageDataset, load_dataset, split_holdout
from retrac.evaluation import metrics
from retrac.evaluation.experiment import Clock, save_npz
from retrac.evaluation.retraining import RetrainJob, query_losses, random_subsets, retrain_all
from retrac.exceptions import EvaluationError, RetracError
from retrac.plan import IndexPlan
from retrac.scoring import METHODS
from retrac.training import train

DEFAULT_ESTIMATOR = "paper"
"""The name under which results appear when `QuerySpec` offers no choice of estimator."""
GENERALLY_INFLUENTIAL_SHARE = 0.25
"""Of the queries, whose top-k a sample must be in to count as generally influential (as the experiment)."""


class LdsConfig(BaseModel):
    """An LDS run: data, the model and its training, the subsets, the query and the removal check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field("builtin:digits", description="dataset source of training and query images")
    resolution: int = Field(8, ge=4)
    channels: Literal[1, 3] = 1
    n_train: int = Field(128, ge=4, description="training images of the full model")
    n_queries: int = Field(16, ge=2, description="held-out query images")
    preset: str = Field("micro", description="UNet preset: micro, tiny or small")
    loss: LossKind = "mse"
    epochs: int = Field(30, ge=1)
    save_every: int = Field(10, ge=1, description="checkpoints of the full model, for TracIn's sum")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    models: int = Field(32, ge=3, description="models trained on random subsets")
    subset_fraction: float = Field(0.5, gt=0, lt=1, description="share of the training set each subset keeps")
    slots: SlotSpec = SlotSpec(replay=True)
    projector: ProjectorSpec = ProjectorSpec(kind="identity")
    query: QuerySpec = QuerySpec(timesteps=10, draws=2, seed=0)
    removal_queries: int = Field(4, ge=0, description="queries of the removal check (0: no removal check)")
    removal_k: int = Field(10, ge=1, description="samples removed per query")
    bootstrap: int = Field(1000, ge=1, description="bootstrap resamples of the LDS interval")
    confidence: float = Field(0.95, gt=0, lt=1)
    workers: int = Field(2, ge=1, description="processes that train the subset models")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fits(self) -> LdsConfig:
        if self.removal_queries > self.n_queries:
            raise ValueError(f"removal_queries {self.removal_queries} exceeds n_queries {self.n_queries}")
        if self.removal_k >= self.n_train:
            raise ValueError(f"removal_k {self.removal_k} must be below n_train {self.n_train}")
        if not 2 <= self.subset_size < self.n_train:
            raise ValueError(
                f"subset_fraction {self.subset_fraction} of {self.n_train} leaves no real subset"
            )
        return self

    @property
    def subset_size(self) -> int:
        return round(self.subset_fraction * self.n_train)

    @classmethod
    def quick(cls) -> LdsConfig:
        """32 micro models on half of 128 digits at 8 px: a few minutes on 2 cores. The index holds
        shared-noise grid slots at the query's K, M and seed besides the replayed step, so both
        estimators are scored, projected by a count sketch of k = 4,096: full-length rows of 11 slots
        make the band parts of every sample for every query (the attribution path ranks all N)
        take 12 GB at 45k parameters."""
        return cls(slots=matched_slots_for(cls.model_fields["query"].default),
                   projector=ProjectorSpec(kind="sketch", dim=4096, seed=0))

    @classmethod
    def smoke(cls) -> LdsConfig:
        """A check that everything runs: 4 models of 2 epochs on 8 of 16 digits; seconds."""
        return cls(
            n_train=16,
            n_queries=3,
            epochs=2,
            save_every=1,
            batch_size=8,
            models=4,
            slots=matched_slots_for(QuerySpec(timesteps=3, draws=1, seed=0)),  # so matched runs too
            query=QuerySpec(timesteps=3, draws=1, seed=0),
            removal_queries=1,
            removal_k=2,
            bootstrap=50,
        )


def matched_slots_for(query: QuerySpec) -> SlotSpec:
    """The replayed step plus the shared-noise grid slots the matched estimator pairs with `query`."""
    return SlotSpec(replay=True, grid=query.timesteps, noise="shared", draws=query.draws, seed=query.seed)


LDS_PRESETS = {"smoke": LdsConfig.smoke, "quick": LdsConfig.quick}


class RemovalResult(BaseModel):
    """Change of each removal query's loss from the full model's, when its top-k proponents are removed
    (per method and estimator) and when k random samples are: a faithful attribution raises it more."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int
    queries: list[str]
    full_loss: list[float]
    top_k: dict[str, dict[str, list[float]]] = Field(description="method -> estimator -> change per query")
    random: list[float] = Field(description="change per query when k random samples are removed")
    top_k_mean: dict[str, dict[str, float]]
    random_mean: float


class LdsReport(BaseModel):
    """What `run_lds` measured; written as `lds.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict[str, Any]
    estimators: list[str]
    skipped: dict[str, str] = Field(description="estimators that could not score this index, and why")
    queries: list[str]
    subset_size: int
    actual_losses: list[list[float]] = Field(description="(models, queries) loss under each subset model")
    lds: dict[str, dict[str, float]] = Field(description="method -> estimator -> mean Spearman over queries")
    lds_ci: dict[str, dict[str, list[float]]] = Field(description="method -> estimator -> [low, high]")
    lds_per_query: dict[str, dict[str, list[float]]]
    removal: RemovalResult | None
    generally_influential: dict[str, dict[str, int]] = Field(
        description="method -> estimator -> samples in the top-k of at least a quarter of the queries "
        "(k = removal_k) under the full model"
    )
    timings: dict[str, float] = Field(description="seconds per phase (machine-dependent)")


def query_estimators() -> dict[str, dict[str, Any]]:
    """The query estimators `QuerySpec` offers: name -> the QuerySpec fields that choose it.

    Read from the spec's `estimator` field (a Literal), so a new estimator is evaluated as soon as
    the spec lists it; without such a field there is one, the paper's.
    """
    field = QuerySpec.model_fields.get("estimator")
    if field is None:
        return {DEFAULT_ESTIMATOR: {}}
    names = typing.get_args(field.annotation)
    if not names:
        raise EvaluationError(f"QuerySpec.estimator is {field.annotation}, not a Literal of names")
    return {str(name): {"estimator": name} for name in names}


def score_matrix(attributor: Attributor, images: Any, query: QuerySpec) -> dict[Method, np.ndarray]:
    """Full `(Q, N)` score matrices per method through the one attribution path (every sample ranked)."""
    ids = attributor.plan.dataset.ids
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    results = attributor.attribute(images, query, top_k=len(ids))
    scores = {m: np.empty((len(results), len(ids))) for m in METHODS}
    for q, result in enumerate(results):
        for method in METHODS:
            for entry in result.methods[method].proponents:
                scores[method][q, position[entry.sample_id]] = entry.score
    return scores


def run_lds(config: LdsConfig, out_dir: str | Path, *, progress: bool = True) -> LdsReport:
    """Run the whole LDS evaluation into `out_dir` (data/, run/, lds.json); see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    with clock("data"):
        training, queries = split_data(config)
        dataset = DatasetSpec(source=str(save_npz(training, out.resolve() / "data" / "train.npz")),
                              resolution=config.resolution, channels=config.channels)
    with clock("train"):
        train(train_spec(config, dataset, save_every=config.save_every), training, out / "run")
    with clock("attribute"):
        plan = IndexPlan.resolve(IndexSpec(dataset=dataset, run=str(out / "run"), slots=config.slots,
                                           projector=config.projector))
        attributor = Attributor(plan)
        attributor.index()
        scores, skipped = _scores(attributor, queries, config.query)
        last = attributor.model(len(plan.checkpoints) - 1)
        full_loss = query_losses(last, plan.loss, queries.images, config.query)
    with clock("retrain"):
        masks = random_subsets(config.models, config.subset_size, config.n_train, config.seed)
        removals = _removal_keeps(config, scores)
        keeps = [tuple(np.flatnonzero(m).tolist()) for m in masks] + list(dict.fromkeys(removals.values()))
        spec = train_spec(config, dataset, save_every=config.epochs)
        jobs = [RetrainJob(spec, training, keep, queries.images, config.query) for keep in keeps]
        with tqdm(total=len(jobs), desc="retrain", unit="model", disable=not progress) as bar:
            losses = retrain_all(jobs, workers=config.workers, on_done=bar.update)
    with clock("evaluate"):
        actual = losses[: config.models]
        removed = dict(zip(keeps[config.models :], losses[config.models :], strict=True))
        lds: dict[str, Any] = {}
        intervals: dict[str, Any] = {}
        per_query: dict[str, Any] = {}
        for method, by_estimator in scores.items():
            for estimator, matrix in by_estimator.items():
                values = metrics.lds_per_query(actual, metrics.subset_predictions(matrix, masks))
                per_query.setdefault(method, {})[estimator] = values.tolist()
                lds.setdefault(method, {})[estimator] = float(values.mean())
                intervals.setdefault(method, {})[estimator] = list(metrics.bootstrap_interval(
                    values, resamples=config.bootstrap, confidence=config.confidence, seed=config.seed
                ))
        removal = _removal(config, queries, full_loss, removals, removed) if config.removal_queries else None
        recurring = max(2, math.ceil(GENERALLY_INFLUENTIAL_SHARE * config.n_queries))
        influential = {
            m: {e: len(metrics.generally_influential(metrics.top_k(s, config.removal_k), recurring))
                for e, s in by_estimator.items()}
            for m, by_estimator in scores.items()
        }
    report = LdsReport(
        config=config.model_dump(mode="json"),
        estimators=sorted({e for by_estimator in scores.values() for e in by_estimator}),
        skipped=skipped,
        queries=list(queries.ids),
        subset_size=config.subset_size,
        actual_losses=actual.tolist(),
        lds=lds,
        lds_ci=intervals,
        lds_per_query=per_query,
        removal=removal,
        generally_influential=influential,
        timings=clock.seconds | {"total": clock.total()},
    )
    (out / "lds.json").write_text(report.model_dump_json(indent=1) + "\n")
    return report


def split_data(config: LdsConfig) -> tuple[ImageDataset, ImageDataset]:
    """(training set, held-out queries), a seeded split of the source's first n_train + n_queries images."""
    loaded = load_dataset(DatasetSpec(source=config.source, resolution=config.resolution,
                                      channels=config.channels, limit=config.n_train + config.n_queries,
                                      seed=config.seed))
    if len(loaded) < config.n_train + config.n_queries:
        raise EvaluationError(f"{config.source} has {len(loaded)} images; n_train + n_queries needs "
                              f"{config.n_train + config.n_queries}")
    return split_holdout(loaded, config.n_queries, seed=config.seed)


def train_spec(config: LdsConfig, dataset: DatasetSpec, *, save_every: int) -> TrainSpec:
    """The TrainSpec of every model: the full one and each retrained one (same seed, other data)."""
    return TrainSpec(dataset=dataset, preset=config.preset, loss=config.loss, epochs=config.epochs,
                     batch_size=config.batch_size, lr=config.lr, save_every=save_every, seed=config.seed)


def _scores(
    attributor: Attributor, queries: ImageDataset, query: QuerySpec
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """method -> estimator -> `(Q, N)` scores; estimators this index cannot serve go to `skipped`."""
    scores: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
    skipped = {}
    for name, fields in query_estimators().items():
        try:
            matrices = score_matrix(attributor, queries.images, query.model_copy(update=fields))
        except RetracError as error:
            skipped[name] = str(error)
            continue
        for method in METHODS:
            scores[method][name] = matrices[method]
    if not any(scores.values()):
        raise EvaluationError(f"no query estimator could score this index: {skipped}")
    return scores, skipped


def _removal_keeps(
    config: LdsConfig, scores: dict[str, dict[str, np.ndarray]]
) -> dict[tuple[str, str, int], tuple[int, ...]]:
    """(method or "random", estimator or "", query) -> the training positions kept after removal."""
    everyone = np.arange(config.n_train)
    keeps = {}
    for q in range(config.removal_queries):
        for method, by_estimator in scores.items():
            for estimator, matrix in by_estimator.items():
                top = metrics.top_k(matrix[q : q + 1], config.removal_k)[0]
                keeps[method, estimator, q] = tuple(np.setdiff1d(everyone, top).tolist())
        drawn = np.random.default_rng([config.seed, q]).choice(
            config.n_train, config.removal_k, replace=False
        )
        keeps["random", "", q] = tuple(np.setdiff1d(everyone, drawn).tolist())
    return keeps


def _removal(
    config: LdsConfig,
    queries: ImageDataset,
    full_loss: np.ndarray,
    keeps: dict[tuple[str, str, int], tuple[int, ...]],
    losses: dict[tuple[int, ...], np.ndarray],
) -> RemovalResult:
    count = config.removal_queries
    change = {key: float(losses[keep][key[2]] - full_loss[key[2]]) for key, keep in keeps.items()}
    top_k: dict[str, dict[str, list[float]]] = {}
    for method, estimator, _ in keeps:
        if method != "random":
            top_k.setdefault(method, {})[estimator] = [change[method, estimator, q] for q in range(count)]
    random = [change["random", "", q] for q in range(count)]
    return RemovalResult(
        k=config.removal_k,
        queries=list(queries.ids[:count]),
        full_loss=full_loss[:count].tolist(),
        top_k=top_k,
        random=random,
        top_k_mean={m: {e: float(np.mean(v)) for e, v in by.items()} for m, by in top_k.items()},
        random_mean=float(np.mean(random)),
    )


def lds_table(report: LdsReport) -> str:
    """The report as a markdown table: LDS and interval per method and estimator, and the removal check."""
    level = round(100 * report.config["confidence"])
    removal = report.removal
    header = (
        f"| method | estimator | LDS ({len(report.actual_losses)} models, {len(report.queries)} queries) "
        f"| {level}% interval | loss change, top-{removal.k if removal else 'k'} removed |"
    )
    lines = [header, "|---|---|---:|---:|---:|"]
    for method, by_estimator in report.lds.items():
        for estimator, value in by_estimator.items():
            low, high = report.lds_ci[method][estimator]
            change = f"{removal.top_k_mean[method][estimator]:+.4f}" if removal else "-"
            lines.append(f"| {method} | {estimator} | {value:+.3f} | [{low:+.3f}, {high:+.3f}] | {change} |")
    if removal:
        lines.append(f"\nLoss change with {removal.k} random samples removed: {removal.random_mean:+.4f} "
                     f"(mean over {len(removal.queries)} queries; full model's mean loss "
                     f"{sum(removal.full_loss) / len(removal.full_loss):.4f}).")
    return "\n".join(lines)
