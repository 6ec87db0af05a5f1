"""Outlier detection by self-influence on mixtures with planted outliers (method.md section 6).

Two mixtures, each a majority plus about 4% planted outliers (the paper's ratio, 200 / 5,200):

- `patches+zeros`: `builtin:outliers`, photo patches with planted digit zeros;
- `digits+faces`: scikit-learn's digits with planted LFW faces.

`detect_outliers` trains on one, indexes every sample in memory (the replayed step plus grid slots),
ranks the samples by self-influence exactly as `retrac self-influence` does
(`retrac.scoring.self_influence`), and reports the ROC AUC and recall of the planted group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api_schemas import DatasetSpec, IndexSpec, LossKind, ProjectorSpec, SlotSpec, TrainSpec
from retrac.attribution import Attributor
from retrac.datasets import ImageDataset, load_dataset, outlier_mixture
from retrac.evaluation import metrics
from retrac.evaluation.experiment import Clock, save_npz
from retrac.plan import IndexPlan
from retrac.scoring import METHODS, self_influence, self_influence_slots
from retrac.training import train

MixName = Literal["patches+zeros", "digits+faces"]
MIXES: tuple[MixName, ...] = ("patches+zeros", "digits+faces")
OUTLIER_SHARE = 0.04
"""Planted outliers per training sample, as in `builtin:outliers`."""
OUTLIER = "outlier"


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
    projector: ProjectorSpec = ProjectorSpec(kind="sketch", dim=4096, seed=0)
    seed: int = Field(0, ge=0)


class OutlierResult(BaseModel):
    """How well self-influence finds the planted group, per method."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict
    samples: int
    outliers: int
    auc: dict[str, float] = Field(description="ROC AUC of the planted group under each method's self-influence")
    recall: dict[str, float] = Field(description="planted outliers among the |outliers| highest self-influences")
    timings: dict[str, float]


def planted_mix(mix: MixName, n_train: int, resolution: int, seed: int) -> ImageDataset:
    """`n_train` images, about `OUTLIER_SHARE` of them planted outliers (group "outlier"), shuffled."""
    shape = {"resolution": resolution, "channels": 1, "seed": seed}
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
        dataset = DatasetSpec(source=str(save_npz(data, out.resolve() / "train.npz")), resolution=config.resolution)
        spec = TrainSpec(dataset=dataset, preset=config.preset, loss=config.loss, epochs=config.epochs,
                         batch_size=config.batch_size, lr=config.lr, save_every=config.save_every, seed=config.seed)
        train(spec, data, out / "run")
    with clock("index"):
        slots = SlotSpec(replay=True, grid=config.grid, seed=config.seed)
        plan = IndexPlan.resolve(IndexSpec(dataset=dataset, run=str(out / "run"), slots=slots,
                                           projector=config.projector))
        rows = Attributor(plan).index()
    with clock("score"):
        scores = self_influence(rows, plan.weights, *self_influence_slots(slots.kinds))
        planted = [g == OUTLIER for g in data.groups or ()]
    return OutlierResult(
        config=config.model_dump(mode="json"),
        samples=len(data),
        outliers=sum(planted),
        auc={m: metrics.roc_auc(scores[m].numpy(), planted) for m in METHODS},
        recall={m: metrics.recall_at_count(scores[m].numpy(), planted) for m in METHODS},
        timings=clock.seconds | {"total": clock.total()},
    )
