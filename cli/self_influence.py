"""`retrac self-influence STORE`: the training samples that most influence their own loss.

Computed from the stored slots alone (method.md section 4), so it needs a store with grid slots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from retrac.exceptions import SpecError
from retrac.scoring import METHODS


def register(app: typer.Typer) -> None:
    app.command(
        "self-influence",
        help="Rank a store's training samples by self-influence (outlier / mislabel hunting).",
        short_help="rank a store's training samples by self-influence (outlier / mislabel hunting)",
    )(run)


def run(
    store: Annotated[Path, typer.Argument(help="a filled gradient store with grid slots")],
    top_k: Annotated[int, typer.Option(help="samples per method")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> int:
    import numpy as np

    from storage import GradientStore
    from storage.statistics import self_influence

    if top_k < 1:
        raise SpecError("--top-k must be at least 1")
    opened = GradientStore.open(store)
    scores = self_influence(opened)
    ranked = {
        method: [
            {"rank": rank + 1, "sample_id": opened.sample_ids[row], "score": float(scores[method][row])}
            for rank, row in enumerate(np.argsort(-scores[method], kind="stable")[:top_k].tolist())
        ]
        for method in METHODS
    }
    if as_json:
        print(json.dumps(ranked, indent=1))
        return 0
    for method, entries in ranked.items():
        print(f"{method}: " + ", ".join(f"{e['sample_id']} ({e['score']:.3g})" for e in entries))
    return 0
