"""`retrac attribute`: proponents and opponents of query images, from a filled gradient store."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from api_schemas import QuerySpec
from retrac.scoring import METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attribute",
        help="rank the training samples of a store for query images (TracIn and ReTrac)",
        description="Compute the query images' gradients at each checkpoint and stream the store once.",
    )
    parser.add_argument("store", type=Path, help="a filled gradient store (retrac index create/run)")
    parser.add_argument("images", type=Path, nargs="+", help="query images: PNG, JPEG or .npy")
    parser.add_argument("--top-k", type=int, default=5, help="proponents and opponents per method (default: 5)")
    parser.add_argument("--timesteps", type=int, default=QuerySpec().timesteps, help="K, query timestep grid size")
    parser.add_argument("--draws", type=int, default=QuerySpec().draws, help="M, noise draws per timestep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query's noise draws")
    parser.add_argument("--gallery", type=Path, help="write a PNG of each query's top proponents per method")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from retrac import viz
    from retrac.datasets import ImageDataset, load_image_file
    from storage import GradientStore, attribute

    store = GradientStore.open(args.store)
    dataset = store.spec.dataset
    images = torch.stack(
        [load_image_file(path, resolution=dataset.resolution, channels=dataset.channels) for path in args.images]
    )
    query = QuerySpec(timesteps=args.timesteps, draws=args.draws, seed=args.seed)
    answer = attribute(store, images, query, top_k=args.top_k)
    if args.json:
        print(json.dumps({
            "queries": [str(p) for p in args.images],
            "results": [result.model_dump(mode="json") for result in answer.results],
            "timings": asdict(answer.timings),
        }, indent=1))
    else:
        for path, result in zip(args.images, answer.results, strict=True):
            print(f"\n{path}")
            for method in METHODS:
                for side in ("proponents", "opponents"):
                    ranked = ", ".join(f"{i.sample_id} ({i.score:.3g})" for i in getattr(result.methods[method], side))
                    print(f"  {method:6} {side:10} {ranked}")
        print(f"\nquery gradients {answer.timings.gradient_s:.2f} s, scan {answer.timings.scan_s:.3f} s")
    if args.gallery is not None:
        queries = ImageDataset(images, tuple(f"query-{i}" for i in range(len(images))), "queries")
        row_of = {sample_id: row for row, sample_id in enumerate(store.sample_ids)}
        rankings = {
            method: (
                np.array([[row_of[i.sample_id] for i in r.methods[method].proponents] for r in answer.results]),
                np.array([[i.score for i in r.methods[method].proponents] for r in answer.results]),
            )
            for method in METHODS
        }
        viz.gallery(args.gallery, queries, rankings, store.plan.dataset, query_labels=[p.name for p in args.images])
        print(f"gallery: {args.gallery}", file=sys.stderr if args.json else sys.stdout)
    return 0
