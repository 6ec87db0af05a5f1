"""`retrac self-influence STORE`: the training samples that most influence their own loss.

Computed from the stored slots alone (method.md section 4), so it needs a store with grid slots.
"""

from __future__ import annotations

import argparse
import json
from cli.common import store_location

from retrac.exceptions import SpecError
from retrac.scoring import METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "self-influence", help="rank a store's training samples by self-influence (outlier / mislabel hunting)"
    )
    parser.add_argument("store", help="a filled store with grid slots: folder or s3://BUCKET/PREFIX")
    parser.add_argument("--top-k", type=int, default=20, help="samples per method")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from storage import GradientStore
    from storage.statistics import self_influence

    if args.top_k < 1:
        raise SpecError("--top-k must be at least 1")
    store = GradientStore.open(store_location(args.store))
    scores = self_influence(store)
    ranked = {
        method: [
            {"rank": rank + 1, "sample_id": store.sample_ids[row], "score": float(scores[method][row])}
            for rank, row in enumerate(np.argsort(-scores[method], kind="stable")[: args.top_k].tolist())
        ]
        for method in METHODS
    }
    if args.json:
        print(json.dumps(ranked, indent=1))
        return 0
    for method, entries in ranked.items():
        print(f"{method}: " + ", ".join(f"{e['sample_id']} ({e['score']:.3g})" for e in entries))
    return 0
