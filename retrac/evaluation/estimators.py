"""The default query next to the paper's on one trained run: does each find a training image from the
image itself and from a copy shifted by one pixel?

What `retrac demo` prints after the paper's experiment. The default is what `retrac attribute` runs on
an index of `index create`'s defaults (`DEFAULT_SLOTS`, `DEFAULT_KERNEL`, methods and estimator from
`retrac.defaults.chosen`: trak, matched); the paper's runs on the paper's slots (the replayed step
alone) with its estimator (tracin and retrac). Both score through the one attribution path
(`Attributor.score_every_row`), at the run's last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from api_schemas import IndexSpec, Method, ProjectorSpec, QuerySpec
from api_schemas.specs import DEFAULT_KERNEL, DEFAULT_SLOTS, PAPER_SLOTS
from retrac.attribution import Attributor
from retrac.defaults import chosen
from retrac.evaluation import retrieval
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun

USES = {
    "default": "the measured best at finding what made an image (docs/experiment.md); what attribute runs",
    "paper": "Diffusion-TracIn and -ReTrac exactly as the paper defines them (--estimator paper)",
}
"""What each query is for, one line each."""


class EstimatorRow(BaseModel):
    """One query's figures per method it ran."""

    model_config = ConfigDict(frozen=True)

    name: str
    estimator: str
    self_top1: dict[Method, float]
    shifted_top3: dict[Method, float]


def compare_estimators(run_folder: Path, count: int, paper_query: QuerySpec) -> list[EstimatorRow]:
    """The default and the paper's query on the first `count` training images of the run and on their
    1-pixel shifts; `paper_query` the paper's K, M and seed (the matched estimator takes the index's).
    Both indexes project as `index create` does by default (`ProjectorSpec()`)."""
    run = TrainingRun.load(run_folder)
    base = IndexSpec(
        dataset=run.spec.dataset, run=str(run.folder), checkpoints=tuple(run.checkpoints()[-1:]),
        projector=ProjectorSpec(),
    )
    asked = {"default": QuerySpec(), "paper": paper_query.model_copy(update={"estimator": "paper"})}
    specs = {
        "default": base.model_copy(update={"slots": DEFAULT_SLOTS, "kernel": DEFAULT_KERNEL}),
        "paper": base.model_copy(update={"slots": PAPER_SLOTS}),
    }
    out = []
    for name, spec in specs.items():
        attributor = Attributor(IndexPlan.resolve(spec))
        attributor.index()
        images = attributor.plan.dataset.images[:count]
        query, methods, _ = chosen(asked[name], spec, None)
        queries = torch.cat([images, retrieval.shifted(images)])
        scores = attributor.score_every_row(queries, query, methods=methods)
        own = list(range(count))
        out.append(EstimatorRow(
            name=name,
            estimator=query.estimator,
            self_top1={m: retrieval.hit_rate(s[:count].numpy(), own, 1) for m, s in scores.items()},
            shifted_top3={m: retrieval.hit_rate(s[count:].numpy(), own, 3) for m, s in scores.items()},
        ))
    return out


def table(rows: list[EstimatorRow], count: int) -> str:
    """The comparison as markdown, one line per (query, method), with what each query is for."""
    lines = [
        f"| query | method | estimator | self top-1 ({count} training images) | 1-px shift: source top 3 |",
        "|---|---|---|---:|---:|",
    ]
    for row in rows:
        lines += [
            f"| {row.name} | {m} | {row.estimator} | {row.self_top1[m]:.3f} | {row.shifted_top3[m]:.3f} |"
            for m in row.self_top1
        ]
    return "\n".join([*lines, "", *(f"{name}: {use}" for name, use in USES.items())])
