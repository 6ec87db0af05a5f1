"""Diagnostics of an index: how gradient norms depend on the timestep, and self-influence.

Norms that grow toward some timesteps are why Diffusion-TracIn favours the samples trained there
(method.md section 5); self-influence ranks training samples as outlier candidates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api_schemas.common import Public, SampleId

OutlierScore = Literal["tracin", "retrac", "relative_norm", "atypical_direction"]
"""Rankings of training samples as outlier candidates, higher meaning more suspect: self-influence
under each method, the timestep-relative gradient norm, and the atypical gradient direction (minus a
sample's mean cosine with every training sample's gradient at the same slot), which finds planted
outliers best (docs/experiment.md)."""


class NormBinPublic(Public):
    """Norm statistics of the stored slots whose timestep falls in [t_start, t_stop)."""

    t_start: int
    t_stop: int
    count: int
    mean: float | None
    median: float | None
    p10: float | None
    p90: float | None


class NormTimestepPublic(Public):
    """Gradient norm against training timestep over every stored slot of one checkpoint."""

    checkpoint: int
    count: int = Field(description="stored (sample, slot) pairs")
    pearson: float | None = Field(description="correlation of timestep and norm; None if undefined")
    spearman: float | None = Field(description="rank correlation of timestep and norm; None if undefined")
    slope: float | None = Field(
        description="least-squares slope of norm on t/T: the norm's change over the whole schedule "
        "(as `retrac eval norms` reports it); None if undefined"
    )
    bins: list[NormBinPublic]


class SelfInfluenceEntryPublic(Public):
    sample_id: SampleId
    rank: int = Field(ge=1)
    score: float


class SelfInfluencePublic(Public):
    """Training samples by one outlier score, decreasing (`OutlierScore`): the top ones are outlier
    candidates."""

    method: OutlierScore
    data: list[SelfInfluenceEntryPublic]
    count: int
    total: int = Field(description="samples ranked")
    group_auc: dict[str, float] | None = Field(
        None,
        description="where the training samples carry groups (two or more): per group, the ROC AUC of "
        "its members against all other samples under this ranking (a planted outlier group near 1)",
    )
