"""The evaluation report: its JSON schema (pydantic models) and its markdown rendering.

`Report` is what `run_experiment` returns and writes as `report.json`; `headline_table` is the
TracIn-vs-ReTrac table that the CLI prints and `report.md` opens with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

QueryKind = Literal["train", "heldout", "generated"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InfluentialSample(_Model):
    """A training sample in the top-k of many queries, with the training step that explains why."""

    id: str
    group: str | None
    queries: int = Field(description="number of queries whose top-k holds it")
    timestep: int = Field(description="its replayed training timestep at the last checkpoint")
    norm: float = Field(description="its replayed gradient norm at the last checkpoint")


class GenerallyInfluential(_Model):
    min_queries: int = Field(
        description="a sample is generally influential in the top-k of this many queries"
    )
    count: int
    share: float = Field(description="share of all Q*k top-k entries that these samples fill")
    samples: list[InfluentialSample]


class SelfRank(_Model):
    """Rank of each training-image query among all training samples (1 = its own top proponent)."""

    mean: float
    top1: float = Field(description="share of training queries ranked first")
    ranks: list[int]


class MethodMetrics(_Model):
    u_at_k: float = Field(
        description="unique share of the pooled top-k over all queries (1 = fully specific)"
    )
    generally_influential: GenerallyInfluential
    precision_at_k: dict[str, float] = Field(description="per group of held-out queries")
    outlier_intrusion: float = Field(
        description="share of held-out majority queries' top-k that are outliers"
    )
    query_self_rank: SelfRank
    self_influence_recall: float = Field(description="outliers among the |outliers| highest self-influences")
    self_influence_auc: float


class NormTimestepStatistics(_Model):
    """Replayed (timestep, gradient norm) of every training sample at one checkpoint, and their fit."""

    checkpoint_epoch: int
    samples: int
    pearson: float = Field(description="Pearson correlation of norm with timestep")
    spearman: float = Field(description="Spearman correlation of norm with timestep")
    slope: float = Field(
        description="least-squares slope of norm on t/T: the norm's change over the schedule"
    )
    relative_slope: float = Field(description="slope divided by the mean norm")
    t_max: int = Field(description="timestep of the largest mean norm on the curve grid")
    distance_pearson: float = Field(description="Pearson correlation of norm with |t - t_max|")
    distance_spearman: float = Field(description="Spearman correlation of norm with |t - t_max|")
    curve_timesteps: list[int]
    curve_mean_norms: list[float] = Field(
        description="mean over the curve samples of the norm at each grid step"
    )


class QueryInfo(_Model):
    id: str
    kind: QueryKind
    group: str


class Setup(_Model):
    """What was actually built: sizes, checkpoints and their weights, the model and the index."""

    train_samples: int
    group_sizes: dict[str, int]
    checkpoint_epochs: list[int]
    checkpoint_weights: list[float]
    parameters: int
    projector: str
    slots: str


class Report(_Model):
    config: dict[str, Any]
    setup: Setup
    top_k: int
    queries: list[QueryInfo]
    tracin: MethodMetrics
    retrac: MethodMetrics
    norm_timestep: NormTimestepStatistics
    timings: dict[str, float] = Field(description="seconds per phase (machine-dependent, for orientation)")
    figures: list[str] = Field(description="PNG file names, relative to the report's folder")


def headline_table(report: Report) -> str:
    """The TracIn-vs-ReTrac table (markdown) and one line on norm vs timestep."""
    k, tracin, retrac = report.top_k, report.tracin, report.retrac
    heldout = sorted({q.group for q in report.queries if q.kind == "heldout"})
    outliers = report.setup.group_sizes.get("outlier", 0)
    gi = tracin.generally_influential.min_queries
    rows: list[tuple[str, str, str]] = [
        (
            f"U@{k} over {len(report.queries)} queries (higher: more specific)",
            _num(tracin.u_at_k),
            _num(retrac.u_at_k),
        ),
        (
            f"generally influential samples: in the top-{k} of >= {gi} queries (lower)",
            str(tracin.generally_influential.count),
            str(retrac.generally_influential.count),
        ),
        (
            f"share of all top-{k} entries they fill (lower)",
            _num(tracin.generally_influential.share),
            _num(retrac.generally_influential.share),
        ),
        *[
            (
                f"precision@{k}, held-out {g} queries (higher)",
                _num(tracin.precision_at_k[g]),
                _num(retrac.precision_at_k[g]),
            )
            for g in heldout
        ],
        (
            f"outlier intrusion into held-out majority queries' top-{k} (lower)",
            _num(tracin.outlier_intrusion),
            _num(retrac.outlier_intrusion),
        ),
        (
            "rank of a training-image query among all samples, mean (lower)",
            f"{tracin.query_self_rank.mean:.1f}",
            f"{retrac.query_self_rank.mean:.1f}",
        ),
        (
            f"self-influence: outliers among the top {outliers} (recall, higher)",
            _num(tracin.self_influence_recall),
            _num(retrac.self_influence_recall),
        ),
        (
            "self-influence: ROC AUC of outliers (higher)",
            _num(tracin.self_influence_auc),
            _num(retrac.self_influence_auc),
        ),
    ]
    lines = ["| metric | TracIn | ReTrac |", "|---|---:|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    norm = report.norm_timestep
    lines.append("")
    lines.append(
        f"Norm vs timestep (epoch {norm.checkpoint_epoch}, {norm.samples} replayed training steps): "
        f"Pearson {norm.pearson:.2f}, Spearman {norm.spearman:.2f}, slope {norm.slope:.3g} per schedule "
        f"({norm.relative_slope:+.2f} x mean norm); largest norms near t = {norm.t_max}, "
        f"Spearman of norm with |t - t_max| {norm.distance_spearman:.2f}."
    )
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """`report.md`: the headline table, the generally influential samples named, and the figures."""
    parts = ["# TracIn vs ReTrac on an outlier model", "", headline_table(report), ""]
    for method in ("tracin", "retrac"):
        found = getattr(report, method).generally_influential
        parts.append(
            f"## Generally influential under {'TracIn' if method == 'tracin' else 'ReTrac'} ({found.count})"
        )
        parts.append("")
        parts += [
            f"- `{s.id}` ({s.group}): top-{report.top_k} of {s.queries} queries; trained at t = "
            f"{s.timestep}, gradient norm {s.norm:.3g}"
            for s in found.samples
        ] or ["- none"]
        parts.append("")
    parts += [f"![{name}]({name})" for name in report.figures]
    return "\n".join(parts) + "\n"


def write_report(report: Report, out_dir: str | Path) -> None:
    """Write `report.json` and `report.md` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))


def _num(value: float) -> str:
    return f"{value:.3f}"
