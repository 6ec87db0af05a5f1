"""`retrac attribute`: proponents and opponents of query images, from a filled gradient store."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

from api_schemas import QuerySpec
from api_schemas.specs import DEFAULT_TOP_K
from cli.common import store_location, validated
from retrac.exceptions import SpecError
from retrac.scoring import METHODS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"}
"""Files of a query folder that are read as images."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attribute",
        help="rank the training samples of a store for query images (TracIn and ReTrac)",
        description="Compute the query images' gradients at each checkpoint and stream the store once.",
    )
    parser.add_argument("store", help="a filled store (retrac index create/run): folder or s3://BUCKET/PREFIX")
    parser.add_argument("images", type=Path, nargs="+", help="query images (PNG, JPEG or .npy) or folders of them")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="proponents and opponents per method")
    parser.add_argument("--all", action="store_true", help="rank every training sample (overrides --top-k)")
    parser.add_argument("--timesteps", type=int, default=QuerySpec().timesteps, help="K, query timestep grid size")
    parser.add_argument("--draws", type=int, default=QuerySpec().draws, help="M, noise draws per timestep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query's noise draws")
    parser.add_argument("--gallery", type=Path, help="write a PNG of each query's top proponents per method")
    parser.add_argument("--format", choices=("text", "json", "csv"), default="text", help="how to print the results")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the query gradients")
    parser.set_defaults(run=run)


def query_files(paths: list[Path]) -> list[Path]:
    """The image files named, a folder standing for its image files in name order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise SpecError(f"{path}: a folder without image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        else:
            found.append(path)
    return found


def print_csv(files: list[Path], results: list) -> None:
    """One row per (query, method, side, rank): query,method,side,rank,sample_id,score."""
    writer = csv.writer(sys.stdout)
    writer.writerow(["query", "method", "side", "rank", "sample_id", "score"])
    for path, result in zip(files, results, strict=True):
        for method in METHODS:
            for side in ("proponents", "opponents"):
                for rank, influence in enumerate(getattr(result.methods[method], side), start=1):
                    writer.writerow([str(path), method, side, rank, influence.sample_id, repr(influence.score)])


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from retrac import viz
    from retrac.datasets import ImageDataset, load_image_file
    from storage import GradientStore, attribute

    query = validated(QuerySpec, {"timesteps": args.timesteps, "draws": args.draws, "seed": args.seed})
    if args.threads < 1 or (args.top_k < 1 and not args.all):
        raise SpecError("--threads and --top-k must be at least 1")
    torch.set_num_threads(args.threads)
    store = GradientStore.open(store_location(args.store))
    dataset = store.spec.dataset
    args.images = query_files(args.images)
    images = torch.stack(
        [load_image_file(path, resolution=dataset.resolution, channels=dataset.channels) for path in args.images]
    )
    answer = attribute(store, images, query, top_k=store.num_rows if args.all else args.top_k)
    if args.format == "csv":
        print_csv(args.images, answer.results)
    elif args.format == "json":
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
        print(f"gallery: {args.gallery}", file=sys.stderr if args.format != "text" else sys.stdout)
    return 0
