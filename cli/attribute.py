"""`retrac attribute`: proponents and opponents of query images, from a filled gradient store."""

from __future__ import annotations

import csv
import json
import sys
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import typer

from api_schemas import Estimator, Method, QuerySpec, Search
from api_schemas.specs import DEFAULT_ESTIMATOR, DEFAULT_TOP_K, default_estimator
from cli.common import default, print_notices, store_location, validated
from cli.progress import PhaseBars
from retrac.exceptions import SpecError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"}
"""Files of a query folder that are read as images."""

OutputFormat = Literal["text", "json", "csv"]


def register(app: typer.Typer) -> None:
    app.command(
        "attribute",
        help="Rank the training samples of a store for query images (TracIn and ReTrac): compute the "
        "query images' gradients at each checkpoint and stream the store once.",
        short_help="rank the training samples of a store for query images (TracIn and ReTrac)",
    )(run)


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
        for method in result.methods:
            for side in ("proponents", "opponents"):
                for rank, influence in enumerate(getattr(result.methods[method], side), start=1):
                    writer.writerow(
                        [str(path), method, side, rank, influence.sample_id, repr(influence.score)]
                    )


def run(
    context: typer.Context,
    store: Annotated[
        str, typer.Argument(help="a filled store (retrac index create/run): folder or s3://BUCKET/PREFIX")
    ],
    images: Annotated[list[Path], typer.Argument(help="query images (PNG, JPEG or .npy) or folders of them")],
    top_k: Annotated[int, typer.Option(help="proponents and opponents per method")] = DEFAULT_TOP_K,
    rank_all: Annotated[
        bool, typer.Option("--all", help="rank every training sample (overrides --top-k)")
    ] = False,
    timesteps: Annotated[int, typer.Option(help="K, query timestep grid size")] = default(
        QuerySpec, "timesteps"
    ),
    draws: Annotated[int, typer.Option(help="M, noise draws per timestep")] = default(QuerySpec, "draws"),
    seed: Annotated[int, typer.Option(help="seed of the query's noise draws")] = default(QuerySpec, "seed"),
    estimator: Annotated[
        Estimator | None,
        typer.Option(
            help="matched: per timestep against the store's shared-noise slots (its K, M, seed), the "
            "measured best (docs/experiment.md); paper: Diffusion-TracIn/ReTrac as the paper defines them",
            show_default=f"{DEFAULT_ESTIMATOR} where the store has shared-noise slots (index create's "
            "default), else paper",
        ),
    ] = None,
    search: Annotated[
        Search,
        typer.Option(help="exact: scan every row; approximate: rescore the store's ANN index's candidates"),
    ] = default(QuerySpec, "search"),
    method: Annotated[
        list[str] | None,
        typer.Option(help="a score to rank by (repeatable): tracin, retrac, trak, dtrak (docs/methods.md)",
                     show_default="every method the store serves"),
    ] = None,
    gallery: Annotated[
        Path | None, typer.Option(help="write a PNG of each query's top proponents per method")
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="how to print the results")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="same as --format json")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for the query gradients")] = 1,
    label: Annotated[
        str | None,
        typer.Option(
            help="class of the query images, for a class-conditional store: a class name or its integer "
            "(`retrac index inspect` lists them); required there, refused by an unconditional store",
            show_default="none: an unconditional store",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="text the query images are attributed under, for a text-conditional store: required there "
            "(--prompt '' for the empty, unconditional prompt), refused by any other store",
            show_default="none: not a text-conditional store",
        ),
    ] = None,
) -> int:
    import numpy as np
    import torch

    from retrac import viz
    from retrac.datasets import Conversions, ImageDataset, load_image_file
    from retrac.methods import methods_served
    from storage import GradientStore, attribute

    # only the knobs given on the command line: the matched estimator takes the others from the store
    # (compared by name: typer bundles its own click, whose ParameterSource is not click.core's)
    knobs = {"timesteps": timesteps, "draws": draws, "seed": seed}
    given = {
        k: v for k, v in knobs.items() if getattr(context.get_parameter_source(k), "name", None) != "DEFAULT"
    }
    chosen = estimator or "paper"  # the default is settled once the store is open
    query = validated(QuerySpec, {**given, "estimator": chosen, "search": search, "label": label,
                                     "prompt": prompt})
    if threads < 1 or (top_k < 1 and not rank_all):
        raise SpecError("--threads and --top-k must be at least 1")
    output = "json" if as_json else output
    torch.set_num_threads(threads)
    opened = GradientStore.open(store_location(store))
    if estimator is None:
        settled = default_estimator(opened.spec.slots, search, bool(given))
        query = query.model_copy(update={"estimator": settled})
    methods = [typing.cast(Method, m) for m in method] if method else methods_served(opened.spec)
    dataset = opened.spec.dataset
    files = query_files(images)
    conversions = Conversions()
    pixels = torch.stack(
        [
            load_image_file(
                path, resolution=dataset.resolution, channels=dataset.channels, conversions=conversions
            )
            for path in files
        ]
    )
    print_notices(conversions.notices(len(files), "query images"))
    with PhaseBars() as bars:
        answer = attribute(
            opened, pixels, query, top_k=opened.num_rows if rank_all else top_k, methods=methods,
            on_progress=bars,
        )
    if output == "csv":
        print_csv(files, answer.results)
    elif output == "json":
        print(
            json.dumps(
                {
                    "queries": [str(p) for p in files],
                    "query": answer.query.model_dump(mode="json"),
                    "results": [result.model_dump(mode="json") for result in answer.results],
                    "search": answer.search,
                    "dtype": answer.dtype,
                    "timings": asdict(answer.timings),
                },
                indent=1,
            )
        )
    else:
        for path, result in zip(files, answer.results, strict=True):
            print(f"\n{path}")
            for name, ranking in result.methods.items():
                for side in ("proponents", "opponents"):
                    ranked = ", ".join(f"{i.sample_id} ({i.score:.3g})" for i in getattr(ranking, side))
                    print(f"  {name:6} {side:10} {ranked}")
        ran = answer.query
        label = f", label {ran.label}" if ran.label is not None else ""
        label += f", prompt {ran.prompt!r}" if ran.prompt is not None else ""
        print(f"\n{ran.estimator} estimator, K = {ran.timesteps}, M = {ran.draws}, seed {ran.seed}{label}: "
              f"query gradients {answer.timings.gradient_s:.2f} s, {answer.search} search "
              f"{answer.timings.scan_s:.3f} s over {answer.dtype} rows")
    if gallery is not None:
        queries = ImageDataset(pixels, tuple(f"query-{i}" for i in range(len(pixels))), "queries")
        row_of = {sample_id: row for row, sample_id in enumerate(opened.sample_ids)}
        rankings: dict[str, tuple[np.ndarray, np.ndarray]] = {
            name: (
                np.array([[row_of[i.sample_id] for i in r.methods[name].proponents] for r in answer.results]),
                np.array([[i.score for i in r.methods[name].proponents] for r in answer.results]),
            )
            for name in methods
        }
        viz.gallery(gallery, queries, rankings, opened.plan.dataset, query_labels=[p.name for p in files])
        print(f"gallery: {gallery}", file=sys.stderr if output != "text" else sys.stdout)
    return 0
