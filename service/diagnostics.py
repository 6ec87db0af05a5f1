"""Norm-vs-timestep statistics and plot of stored slots, and the self-influence ranking, as answers.

The statistics say how strongly gradient norms depend on the training timestep (method.md section 5);
the plot shows every stored slot with the binned median over it.
"""

from __future__ import annotations

import io
from typing import cast

import numpy as np
from matplotlib.figure import Figure

from api_schemas.diagnostics import (
    NormBinPublic,
    NormTimestepPublic,
    OutlierScore,
    SelfInfluenceEntryPublic,
    SelfInfluencePublic,
)
from retrac.evaluation.metrics import group_auc
from retrac.evaluation.norms import norm_fit
from storage import StoredNorms


def norm_statistics(norms: StoredNorms, checkpoint: int, num_timesteps: int, bins: int) -> NormTimestepPublic:
    """Correlations, fit slope (`retrac.evaluation.norms.norm_fit`: per unit t/T) and per-bin quantiles of
    norm against timestep over all stored slots."""
    t = norms.timesteps.reshape(-1).astype(np.float64)
    n = norms.norms.reshape(-1).astype(np.float64)
    line = norm_fit(t, n, num_timesteps)
    edges = np.linspace(0, num_timesteps, bins + 1).round().astype(int)
    return NormTimestepPublic(
        checkpoint=checkpoint,
        count=int(t.size),
        pearson=line.pearson if line else None,
        spearman=line.spearman if line else None,
        slope=line.slope if line else None,
        bins=[
            _bin(n[(t >= lo) & (t < hi)], int(lo), int(hi))
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ],
    )


def _bin(values: np.ndarray, start: int, stop: int) -> NormBinPublic:
    if values.size == 0:
        return NormBinPublic(t_start=start, t_stop=stop, count=0, mean=None, median=None, p10=None, p90=None)
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return NormBinPublic(
        t_start=start,
        t_stop=stop,
        count=int(values.size),
        mean=float(values.mean()),
        median=float(median),
        p10=float(p10),
        p90=float(p90),
    )


def norm_plot(norms: StoredNorms, statistics: NormTimestepPublic, title: str) -> bytes:
    """A PNG scatter of (timestep, norm) per slot, with the binned median on top.

    Built on a bare `Figure` (no pyplot): no global state, no display backend, safe in server threads.
    """
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    for slot, kind in enumerate(norms.slot_kinds):
        axes.scatter(
            norms.timesteps[:, slot], norms.norms[:, slot], s=6, alpha=0.5, label=f"slot {slot} ({kind})"
        )
    filled = [b for b in statistics.bins if b.median is not None]
    axes.plot(
        [(b.t_start + b.t_stop) / 2 for b in filled],
        [cast(float, b.median) for b in filled],
        "k-",
        lw=2,
        label="binned median",
    )
    axes.set(xlabel="training timestep t", ylabel="gradient norm ||g||", title=title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def self_influence_ranking(
    scores: np.ndarray,
    sample_ids: tuple[str, ...],
    method: OutlierScore,
    limit: int,
    groups: tuple[str, ...] | None = None,
) -> SelfInfluencePublic:
    """The `limit` samples of highest score `method`, highest first, and each group's AUC if known."""
    order = np.argsort(-scores, kind="stable")[:limit]
    data = [
        SelfInfluenceEntryPublic(sample_id=sample_ids[row], rank=rank + 1, score=float(scores[row]))
        for rank, row in enumerate(order.tolist())
    ]
    return SelfInfluencePublic(
        method=method, data=data, count=len(data), total=int(scores.size), group_auc=group_auc(scores, groups)
    )
