"""Counterfactual validation of attributions: the linear datamodeling score (LDS) and the removal check.

LDS (Park et al., TRAK, 2023; Zheng et al., D-TRAK, 2024) asks the counterfactual question: train
models on random subsets of the training set and check whether summing a query's attributions over
each subset orders the subsets as the query's actual loss under those models does.

Steps of `run_lds`, each timed, every result cached under `out_dir` so that a killed run resumes:

1. data: `n_train` training images and `n_queries` held-out validation queries, equal shares of each
   of `sources` (seeded); `n_generated` images sampled from the full model are the generated queries.
2. train: the full model, on every training image, with the replay record (`out_dir/run`).
3. attribute: per engine method and query estimator (`retrac.evaluation.lds_scores`), and the
   pixel-cosine baseline, full `(Q, N)` score matrices per query split (validation, generated, and
   `self_queries` training images for self-retrieval).
4. retrain: `models` models on seeded random subsets of `subset_fraction` of the training set, the
   first `seed_models` of them again with the next training seed (the variance that seed alone
   causes), and for the first `removal_queries` validation queries, models without each one's
   top-`removal_k` proponents and without `removal_k` random samples (`retrain_all`, cached in
   `out_dir/models`). Each query's loss is measured under `measure`, noise apart from the scores'.
5. evaluate: per split, LDS = the mean over queries of the Spearman correlation, over the subset
   models, between the actual loss and `-sum_{i in S} score(q, i)`, with a bootstrap interval over
   queries; removal = the change of each query's loss from the full model's.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from api_schemas import DatasetSpec, IndexSpec, LossKind, ProjectorSpec, QuerySpec, SlotSpec, TrainSpec
from retrac.datasets import ImageDataset, load_dataset, split_holdout
from retrac.evaluation import metrics
from retrac.evaluation.experiment import Clock, save_npz
from retrac.evaluation.lds_scores import (
    BASELINE,
    BASELINE_ESTIMATOR,
    METHOD_INDEX,
    ScoreCache,
    Scores,
    engine_scores,
    pixel_cosine,
)
from retrac.evaluation.retraining import RetrainJob, query_losses, random_subsets, retrain_all
from retrac.evaluation.sampling import generate
from retrac.exceptions import EvaluationError
from retrac.models import DiffusionModel, fingerprint_checkpoint, load_scheduler, load_unet
from retrac.replay import TrainingRun
from retrac.training import train

GENERALLY_INFLUENTIAL_SHARE = 0.25
"""Of the queries, whose top-k a sample must be in to count as generally influential (as the experiment)."""
SPLITS = ("validation", "generated")
"""The query splits LDS is reported for, apart."""
SELF = "self"
"""The split of training images queried for themselves (self-retrieval)."""
GENERATION_STEPS = 50
"""DDIM steps of the generated queries."""


class LdsConfig(BaseModel):
    """An LDS run: data, the model and its training, the subsets, the query and the removal check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[str, ...] = Field(
        ("builtin:digits",), min_length=1, description="dataset sources, mixed in equal shares"
    )
    resolution: int = Field(8, ge=4)
    channels: Literal[1, 3] = 1
    n_train: int = Field(128, ge=4, description="training images of the full model")
    n_queries: int = Field(16, ge=2, description="held-out validation queries")
    n_generated: int = Field(0, ge=0, description="generated queries (DDIM samples of the full model)")
    self_queries: int = Field(0, ge=0, description="training images queried for themselves (self-retrieval)")
    preset: str = Field("micro", description="UNet preset: micro, tiny or small")
    loss: LossKind = "mse"
    epochs: int = Field(30, ge=1)
    save_every: int = Field(10, ge=1, description="checkpoints of the full model, for TracIn's sum")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    models: int = Field(32, ge=3, description="models trained on random subsets")
    seed_models: int = Field(0, ge=0, description="of them, retrained with a second training seed")
    subset_fraction: float = Field(0.5, gt=0, lt=1, description="share of the training set each subset keeps")
    slots: SlotSpec = SlotSpec(replay=True)
    projector: ProjectorSpec = ProjectorSpec(kind="identity")
    query: QuerySpec = QuerySpec(timesteps=10, draws=2, seed=0)
    measure: QuerySpec = Field(
        QuerySpec(timesteps=100, draws=1, seed=1_000_003),
        description="K, M and noise seed of the retrained models' query loss",
    )
    methods: tuple[str, ...] | None = Field(None, description="engine methods; default: every one known")
    removal_queries: int = Field(4, ge=0, description="queries of the removal check (0: no removal check)")
    removal_k: int = Field(10, ge=1, description="samples removed per query")
    bootstrap: int = Field(1000, ge=1, description="bootstrap resamples of the LDS interval")
    confidence: float = Field(0.95, gt=0, lt=1)
    workers: int = Field(2, ge=1, description="processes that train the subset models")
    score_batch: int = Field(32, ge=1, description="queries per scoring call (bounds its memory)")
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
        if self.seed_models > self.models:
            raise ValueError(f"seed_models {self.seed_models} exceeds models {self.models}")
        if self.seed_models == 1 or self.seed_models == 2:
            raise ValueError("seed_models needs 3 or more models for a rank correlation (or 0)")
        if self.self_queries > self.n_train:
            raise ValueError(f"self_queries {self.self_queries} exceeds n_train {self.n_train}")
        if self.n_generated == 1:
            raise ValueError("n_generated needs 2 or more queries for an interval (or 0)")
        return self

    @property
    def subset_size(self) -> int:
        return round(self.subset_fraction * self.n_train)

    @property
    def engine_methods(self) -> tuple[str, ...]:
        return self.methods if self.methods is not None else tuple(METHOD_INDEX)

    @classmethod
    def quick(cls) -> LdsConfig:
        """32 micro models on half of 128 digits at 8 px, 16 validation and 16 generated queries: a few
        minutes on 2 cores. The index holds shared-noise grid slots at the query's K, M and seed besides
        the replayed step, so both estimators are scored, projected by a count sketch of k = 4,096:
        full-length rows of 11 slots make the band parts of every sample for every query (the
        attribution path ranks all N) take 12 GB at 45k parameters."""
        return cls(
            n_generated=16,
            self_queries=32,
            slots=matched_slots_for(cls.model_fields["query"].default),
            projector=ProjectorSpec(kind="sketch", dim=4096, seed=0),
        )

    @classmethod
    def standard(cls) -> LdsConfig:
        """The benchmark that ranks estimators (docs/experiment.md): 1,000 training images at 16 px,
        half digits (8 px scans brought to 16: strokes, ten classes) and half patches of the bundled
        photos (16 px of real texture and edges), so queries have a mode to find and near-duplicates
        are rare; 64 micro models on random halves (8 of them with a second seed), 100 validation and
        100 generated queries, no removal check; sized to fit 2 hours on 2 CPU cores."""
        query = QuerySpec(timesteps=10, draws=2, seed=0)
        return cls(
            sources=("builtin:digits", "builtin:patches"),
            resolution=16,
            n_train=1000,
            n_queries=100,
            n_generated=100,
            self_queries=100,
            epochs=45,
            save_every=15,
            models=64,
            seed_models=8,
            slots=matched_slots_for(query),
            query=query,
            projector=ProjectorSpec(kind="sketch", dim=4096, seed=0),
            removal_queries=0,
        )

    @classmethod
    def smoke(cls) -> LdsConfig:
        """A check that everything runs: 4 models of 2 epochs on 8 of 16 digits; seconds. A sketch of
        k = 256 keeps the kernels of trak and dtrak small."""
        query = QuerySpec(timesteps=3, draws=1, seed=0)
        return cls(
            n_train=16,
            n_queries=3,
            n_generated=3,
            self_queries=4,
            epochs=2,
            save_every=1,
            batch_size=8,
            models=4,
            seed_models=3,
            slots=matched_slots_for(query),  # so matched runs too
            projector=ProjectorSpec(kind="sketch", dim=256, seed=0),
            query=query,
            measure=QuerySpec(timesteps=4, draws=1, seed=7),
            removal_queries=1,
            removal_k=2,
            bootstrap=50,
        )


def matched_slots_for(query: QuerySpec) -> SlotSpec:
    """The replayed step plus the shared-noise grid slots the matched estimator pairs with `query`."""
    return SlotSpec(replay=True, grid=query.timesteps, noise="shared", draws=query.draws, seed=query.seed)


LDS_PRESETS = {"smoke": LdsConfig.smoke, "quick": LdsConfig.quick, "standard": LdsConfig.standard}


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


class SeedVariance(BaseModel):
    """What the training seed alone does to the query losses, over the first `models` subsets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: int
    loss_spearman: float = Field(
        description="mean over queries of the Spearman correlation, over the "
        "subsets, of the loss under the first seed and under the second"
    )
    noise_share: float = Field(
        description="the seed's share of the loss variance: half the mean squared "
        "difference between seeds over the variance across subsets, summed over queries"
    )


class LdsReport(BaseModel):
    """What `run_lds` measured; written as `lds.json`. Split-keyed fields hold `validation` and, with
    generated queries, `generated`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict[str, Any]
    methods: list[str]
    estimators: list[str]
    skipped: dict[str, str] = Field(description="estimators that could not score an index, and why")
    queries: dict[str, list[str]] = Field(description="split -> query ids")
    subset_size: int
    bytes_per_sample: int = Field(
        description="stored bytes of one sample over all checkpoints (rows and norms)"
    )
    actual_losses: dict[str, list[list[float]]] = Field(description="split -> (models, queries) loss")
    lds: dict[str, dict[str, dict[str, float]]] = Field(description="split -> method -> estimator -> LDS")
    lds_ci: dict[str, dict[str, dict[str, list[float]]]] = Field(
        description="split -> method -> estimator -> [low, high]"
    )
    lds_per_query: dict[str, dict[str, dict[str, list[float]]]]
    seed_variance: dict[str, SeedVariance] | None
    self_retrieval: dict[str, dict[str, float]] | None = Field(
        description="method -> estimator -> share of the self queries that rank themselves first"
    )
    removal: RemovalResult | None
    generally_influential: dict[str, dict[str, int]] = Field(
        description="method -> estimator -> samples in the top-k of at least a quarter of the validation "
        "queries (k = removal_k) under the full model"
    )
    timings: dict[str, float] = Field(description="seconds per phase (machine-dependent)")


def run_lds(config: LdsConfig, out_dir: str | Path, *, progress: bool = True) -> LdsReport:
    """Run the whole LDS evaluation into `out_dir` (data/, run/, scores/, models/, lds.json), reusing
    whatever an earlier run of it left there; see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    say = _say if progress else (lambda _: None)
    with clock("data"):
        training, validation = split_data(config)
        dataset = DatasetSpec(
            source=str(save_npz(training, out.resolve() / "data" / "train.npz")),
            resolution=config.resolution,
            channels=config.channels,
        )
    with clock("train"):
        say("train: the full model")
        run = full_run(config, dataset, training, out / "run")
        last = DiffusionModel.from_parts(
            load_unet(run.checkpoints()[-1].path), load_scheduler(run.scheduler_folder)
        )
    with clock("generate"):
        splits = {"validation": validation.images}
        if config.n_generated:
            splits["generated"] = generated_queries(last, config, out / "data" / "generated.npy")
        if config.self_queries:
            splits[SELF] = training.images[: config.self_queries]
    with clock("attribute"):
        base = IndexSpec(
            dataset=dataset, run=str(out / "run"), slots=config.slots, projector=config.projector
        )
        model = " ".join([training.fingerprint, *(fingerprint_checkpoint(c.path) for c in run.checkpoints())])
        scores, skipped = engine_scores(
            base,
            config.engine_methods,
            splits,
            config.query,
            ScoreCache(out / "scores", model),
            batch=config.score_batch,
            on_index=say,
        )
        scores[BASELINE] = {
            BASELINE_ESTIMATOR: {s: pixel_cosine(training.images, q) for s, q in splits.items()}
        }
        full_loss = query_losses(last, run.loss, validation.images, config.measure)
    with clock("retrain"):
        masks = random_subsets(config.models, config.subset_size, config.n_train, config.seed)
        removals = _removal_keeps(config, scores)
        subsets = [tuple(np.flatnonzero(m).tolist()) for m in masks]
        keeps = subsets + list(dict.fromkeys(removals.values()))
        measured = torch.cat([splits[s] for s in SPLITS if s in splits])
        spec = train_spec(config, dataset, save_every=config.epochs)
        second = spec.model_copy(update={"seed": config.seed + 1})
        jobs = [RetrainJob(spec, training, keep, measured, config.measure) for keep in keeps]
        jobs += [
            RetrainJob(second, training, keep, measured, config.measure)
            for keep in subsets[: config.seed_models]
        ]
        say(f"retrain: {len(jobs)} models in {config.workers} processes (cached in {out / 'models'})")
        with tqdm(total=len(jobs), desc="retrain", unit="model", disable=not progress) as bar:
            losses = retrain_all(jobs, workers=config.workers, on_done=bar.update, cache=out / "models")
    with clock("evaluate"):
        columns = _columns(splits)
        actual = {s: losses[: config.models, c] for s, c in columns.items()}
        lds: dict[str, dict[str, dict[str, float]]] = {}
        intervals: dict[str, dict[str, dict[str, list[float]]]] = {}
        per_query: dict[str, dict[str, dict[str, list[float]]]] = {}
        for split in columns:
            for method, by_estimator in scores.items():
                for estimator, by_split in by_estimator.items():
                    values = metrics.lds_per_query(
                        actual[split], metrics.subset_predictions(by_split[split], masks)
                    )
                    per_query.setdefault(split, {}).setdefault(method, {})[estimator] = values.tolist()
                    lds.setdefault(split, {}).setdefault(method, {})[estimator] = float(values.mean())
                    intervals.setdefault(split, {}).setdefault(method, {})[estimator] = list(
                        metrics.bootstrap_interval(
                            values, resamples=config.bootstrap, confidence=config.confidence, seed=config.seed
                        )
                    )
        removal_rows = losses[config.models : len(keeps), columns["validation"]]
        removed = dict(zip(keeps[config.models :], removal_rows, strict=True))
        removal = (
            _removal(config, validation, full_loss, removals, removed) if config.removal_queries else None
        )
        seeds = losses[len(keeps) :]
        variance = (
            {s: seed_variance(losses[: config.seed_models, c], seeds[:, c]) for s, c in columns.items()}
            if config.seed_models
            else None
        )
        recurring = max(2, math.ceil(GENERALLY_INFLUENTIAL_SHARE * config.n_queries))
        influential = {
            m: {
                e: len(
                    metrics.generally_influential(metrics.top_k(s["validation"], config.removal_k), recurring)
                )
                for e, s in by_estimator.items()
            }
            for m, by_estimator in scores.items()
        }
        own = list(range(config.self_queries))
        retrieval = (
            {
                m: {e: float(np.mean(metrics.self_ranks(s[SELF], own) == 1)) for e, s in by.items()}
                for m, by in scores.items()
            }
            if config.self_queries
            else None
        )
    report = LdsReport(
        config=config.model_dump(mode="json"),
        methods=list(scores),
        estimators=sorted({e for by_estimator in scores.values() for e in by_estimator}),
        skipped=skipped,
        queries={"validation": list(validation.ids)}
        | (
            {"generated": [f"generated-{i:03d}" for i in range(config.n_generated)]}
            if config.n_generated
            else {}
        ),
        subset_size=config.subset_size,
        bytes_per_sample=bytes_per_sample(
            base,
            len(run.checkpoints()),
            sum(p.numel() for p in typing.cast(torch.nn.Module, last.unet).parameters()),
        ),
        actual_losses={s: a.tolist() for s, a in actual.items()},
        lds=lds,
        lds_ci=intervals,
        lds_per_query=per_query,
        seed_variance=variance,
        self_retrieval=retrieval,
        removal=removal,
        generally_influential=influential,
        timings=clock.seconds | {"total": clock.total()},
    )
    (out / "lds.json").write_text(report.model_dump_json(indent=1) + "\n")
    return report


def split_data(config: LdsConfig) -> tuple[ImageDataset, ImageDataset]:
    """(training set, validation queries): a seeded split of equal shares of every source's first images
    (the first sources take the remainder)."""
    total = config.n_train + config.n_queries
    parts = []
    for i, source in enumerate(config.sources):
        share = total // len(config.sources) + int(i < total % len(config.sources))
        loaded = load_dataset(
            DatasetSpec(
                source=source,
                resolution=config.resolution,
                channels=config.channels,
                limit=share,
                seed=config.seed,
            )
        )
        if len(loaded) < share:
            raise EvaluationError(
                f"{source} has {len(loaded)} images; its share of n_train + n_queries is {share}"
            )
        parts.append(loaded)
    mixed = (
        parts[0]
        if len(parts) == 1
        else ImageDataset(
            torch.cat([p.images for p in parts]),
            tuple(i for p in parts for i in p.ids),
            " + ".join(config.sources),
        )
    )
    return split_holdout(mixed, config.n_queries, seed=config.seed)


def train_spec(config: LdsConfig, dataset: DatasetSpec, *, save_every: int) -> TrainSpec:
    """The TrainSpec of every model: the full one and each retrained one (same seed, other data)."""
    return TrainSpec(
        dataset=dataset,
        preset=config.preset,
        loss=config.loss,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        save_every=save_every,
        seed=config.seed,
    )


def full_run(config: LdsConfig, dataset: DatasetSpec, training: ImageDataset, folder: Path) -> TrainingRun:
    """The full model's run at `folder`: the one there if it was trained by the same spec on the same
    data, else trained anew (under a temporary name, renamed when complete)."""
    spec = train_spec(config, dataset, save_every=config.save_every)
    if folder.is_dir():
        found = TrainingRun.load(folder)
        if found.spec == spec and found.dataset_fingerprint == training.fingerprint:
            return found
        shutil.rmtree(folder)
    partial = folder.with_name(f".partial-{folder.name}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    train(spec, training, partial)
    os.replace(partial, folder)
    return TrainingRun.load(folder)


def generated_queries(model: DiffusionModel, config: LdsConfig, file: Path) -> torch.Tensor:
    """`n_generated` DDIM samples of `model` (seed `config.seed`), kept in `file` for a resumed run."""
    if file.is_file():
        kept = torch.from_numpy(np.load(file, allow_pickle=False))
        if kept.shape[0] == config.n_generated:
            return kept
    images = generate(
        model.unet,
        model.scheduler,
        config.n_generated,
        sampler="ddim",
        steps=GENERATION_STEPS,
        seed=config.seed,
    )
    partial = file.with_name(f".partial-{os.getpid()}-{file.name}")
    np.save(partial, images.numpy())
    os.replace(partial, file)
    return images


def bytes_per_sample(spec: IndexSpec, checkpoints: int, parameters: int) -> int:
    """Bytes a store keeps per sample: per checkpoint and slot, k projected values (k = `parameters`
    under the identity projector) and a float32 norm."""
    value = 4 if spec.dtype == "float32" else 2
    dim = parameters if spec.projector.kind == "identity" else spec.projector.dim
    return checkpoints * len(spec.slots.kinds) * (dim * value + 4)


def seed_variance(first: np.ndarray, second: np.ndarray) -> SeedVariance:
    """`SeedVariance` of `(models, Q)` losses under two training seeds on the same subsets."""
    spread = first.var(axis=0, ddof=1)
    noise = 0.5 * ((first - second) ** 2).mean(axis=0)
    return SeedVariance(
        models=first.shape[0],
        loss_spearman=float(metrics.lds_per_query(first, second).mean()),
        noise_share=float(noise.sum() / spread.sum()),
    )


def _columns(splits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Columns of each measured split in the retrained models' loss rows."""
    columns, start = {}, 0
    for split in SPLITS:
        if split in splits:
            columns[split] = np.arange(start, start + len(splits[split]))
            start += len(splits[split])
    return columns


def _say(line: str) -> None:
    print(f"lds: {line}", file=sys.stderr, flush=True)


def _removal_keeps(config: LdsConfig, scores: Scores) -> dict[tuple[str, str, int], tuple[int, ...]]:
    """(method or "random", estimator or "", query) -> the training positions kept after removal."""
    everyone = np.arange(config.n_train)
    keeps = {}
    for q in range(config.removal_queries):
        for method, by_estimator in scores.items():
            for estimator, by_split in by_estimator.items():
                top = metrics.top_k(by_split["validation"][q : q + 1], config.removal_k)[0]
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
    """The report as a markdown table: LDS and interval per method and estimator and split, the
    self-retrieval and the removal check."""
    level = round(100 * report.config["confidence"])
    removal = report.removal
    splits = list(report.lds)
    counts = ", ".join(f"{len(report.queries[s])} {s}" for s in splits)
    header = (
        "| method | estimator | "
        + " | ".join(f"LDS {s} | {level}% interval" for s in splits)
        + " | self top-1 | loss change, top-k removed |"
    )
    lines = [
        f"LDS over {len(report.actual_losses[splits[0]])} models; queries: {counts}.",
        "",
        header,
        "|---|---|" + "---:|---:|" * len(splits) + "---:|---:|",
    ]
    for method in report.methods:
        for estimator in report.lds[splits[0]][method]:
            cells = []
            for split in splits:
                low, high = report.lds_ci[split][method][estimator]
                cells += [f"{report.lds[split][method][estimator]:+.3f}", f"[{low:+.3f}, {high:+.3f}]"]
            own = report.self_retrieval[method][estimator] if report.self_retrieval else None
            change = removal.top_k_mean.get(method, {}).get(estimator) if removal else None
            cells += ["-" if own is None else f"{own:.2f}", "-" if change is None else f"{change:+.4f}"]
            lines.append(f"| {method} | {estimator} | " + " | ".join(cells) + " |")
    if removal:
        lines.append(
            f"\nLoss change with {removal.k} random samples removed: {removal.random_mean:+.4f} "
            f"(mean over {len(removal.queries)} queries; full model's mean loss "
            f"{sum(removal.full_loss) / len(removal.full_loss):.4f})."
        )
    if report.seed_variance:
        for split, found in report.seed_variance.items():
            lines.append(
                f"\nSecond training seed on {found.models} subsets, {split}: loss Spearman between seeds "
                f"{found.loss_spearman:+.3f}, seed's share of the loss variance {found.noise_share:.3f}."
            )
    return "\n".join(lines)
