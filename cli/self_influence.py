"""`retrac self-influence STORE`: the training samples that most influence their own loss.

Computed from the stored slots alone (method.md section 4), so it needs a store with grid slots.
Four rankings (`retrac.evaluation.outliers`): self-influence under TracIn and under ReTrac, the
timestep-relative gradient norm, and the atypical gradient direction, which finds planted outliers
best; where the training samples carry groups, each group's ROC AUC under each ranking. Samples are compared
slot by slot, so a store whose grid slots share their noise (`retrac index create --slot-noise shared`) ranks
outliers far better: docs/experiment.md.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import store_location
from retrac.exceptions import SpecError


def register(app: typer.Typer) -> None:
    app.command(
        "self-influence",
        help="Rank a store's training samples by self-influence under TracIn and ReTrac, by timestep-"
        "relative gradient norm and by atypical gradient direction (outlier / mislabel hunting); with each "
        "group's ROC AUC where samples carry groups.",
        short_help="rank a store's training samples by self-influence (outlier / mislabel hunting)",
    )(run)


def run(
    store: Annotated[str, typer.Argument(help="a filled store with grid slots: folder or s3://BUCKET/PREFIX")],
    top_k: Annotated[int, typer.Option(help="samples per ranking")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> int:
    import numpy as np

    from retrac.evaluation.metrics import group_auc
    from storage import GradientStore, outlier_scores

    if top_k < 1:
        raise SpecError("--top-k must be at least 1")
    opened = GradientStore.open(store_location(store))
    scores = outlier_scores(opened)  # checks that every checkpoint is complete
    ranked = {
        name: [
            {"rank": rank + 1, "sample_id": opened.sample_ids[row], "score": float(values[row])}
            for rank, row in enumerate(np.argsort(-values, kind="stable")[:top_k].tolist())
        ]
        for name, values in scores.items()
    }
    groups = opened.plan.dataset.groups
    by_score = {name: group_auc(values, groups) for name, values in scores.items()}
    aucs = {name: auc for name, auc in by_score.items() if auc is not None}  # None: fewer than two groups
    if as_json:
        print(json.dumps({**ranked, **({"group_auc": aucs} if aucs else {})}, indent=1))
        return 0
    for name, entries in ranked.items():
        print(f"{name}: " + ", ".join(f"{e['sample_id']} ({e['score']:.3g})" for e in entries))
    for name, by_group in aucs.items():
        print(f"ROC AUC by group, {name}: " + ", ".join(f"{g} {v:.3f}" for g, v in by_group.items()))
    return 0
