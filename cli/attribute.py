"""`retrac attribute`: proponents and opponents of query images, from a filled gradient store."""

from __future__ import annotations

import sys
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from api_schemas import Method, QuerySpec
from api_schemas.attribution import AttributionsPublic
from api_schemas.specs import DEFAULT_TOP_K
from cli import options
from cli.common import default, gradient_computers, print_notices, store_location, typed_flags
from cli.progress import PhaseBars
from cli.render import CSV_COLUMNS, attributions
from cli.specs import QUERY_FLAGS, query_spec
from retrac.exceptions import SpecError

if TYPE_CHECKING:
    import torch

    from storage import GradientStore

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"}
"""Files of a query folder that are read as images."""


def register(app: typer.Typer) -> None:
    app.command(
        "attribute",
        help="Rank the training samples of a store for query images (TracIn and ReTrac): compute the "
        "query images' gradients at each checkpoint and stream the store once.",
        short_help="rank the training samples of a store for query images (TracIn and ReTrac)",
    )(run)


def query_files(paths: list[Path]) -> list[Path]:
    """The image files named, a folder standing for its image files in name order; each checked to be
    a file retrac reads as an image (from its first bytes), before any model is loaded."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise SpecError(f"{path}: a folder without image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif not path.is_file():
            raise SpecError(f"{path}: no such query image file or folder; give existing images")
        else:
            found.append(path)
    return found


def run(
    context: typer.Context,
    store: options.FilledStore,
    images: options.Images,
    top_k: options.TopK = DEFAULT_TOP_K,
    rank_all: options.RankAll = False,
    timesteps: options.Timesteps = default(
        QuerySpec, "timesteps"
    ),
    draws: options.Draws = default(QuerySpec, "draws"),
    seed: options.QuerySeed = default(QuerySpec, "seed"),
    estimator: options.Estimator = None,
    search: options.Search = default(QuerySpec, "search"),
    method: options.Method = None,
    gallery: options.Gallery = None,
    output: options.Output = "text",
    as_json: options.AsJson = False,
    columns: options.Columns = None,
    threads: options.Threads = 1,
    memory_budget: options.MemoryBudget = None,
    label: options.Label = None,
    prompt: options.Prompt = None,
) -> int:

    import torch

    from retrac import defaults
    from storage import GradientStore, attribute
    from storage.location import index_name

    flags = typed_flags(context, QUERY_FLAGS)  # every input checked before a model loads
    query = query_spec(flags)  # the estimator and methods left out settle once the store opens
    chosen = csv_columns(columns)
    if threads < 1 or (top_k < 1 and not rank_all):
        raise SpecError("--threads and --top-k must be at least 1")
    files = query_files(images)
    started = time.perf_counter()
    torch.set_num_threads(threads)
    opened = GradientStore.open(store_location(store))
    named = [typing.cast(Method, m) for m in method or ()]
    query, methods, picked = defaults.chosen(query, opened.spec, named)
    pixels, notices = read_queries(files, opened)
    print_notices(notices)
    count = opened.num_rows if rank_all else top_k
    with PhaseBars() as bars:
        ranked = attribute(
            opened, pixels, query, top_k=count, methods=methods, on_progress=bars,
            models=gradient_computers(None, threads, memory_budget),
        )
    answer = ranked.public(
        index_name(opened.location), [str(p) for p in files], total_s=time.perf_counter() - started,
        notices=[*notices, *picked],
    )
    attributions(once_each(answer) if rank_all else answer, "json" if as_json else output, chosen)
    print_notices(picked)  # what the defaults chose, once there is an answer
    if gallery is not None:
        draw_gallery(gallery, opened, pixels, answer, files)
        print(f"gallery: {gallery}", file=sys.stderr if output != "text" or as_json else sys.stdout)
    return 0


def read_queries(files: list[Path], opened: GradientStore) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The query images as the store's dataset shape, and the notices of what was converted."""
    import torch

    from retrac.datasets import Conversions, load_image_file

    shape, conversions = opened.spec.dataset, Conversions()
    pixels = torch.stack([
        load_image_file(path, resolution=shape.resolution, channels=shape.channels, conversions=conversions)
        for path in files
    ])
    return pixels, conversions.notices(len(files), "query images")


def csv_columns(columns: list[str] | None) -> list[str]:
    """The CSV columns asked for (all by default); an unknown one is refused naming the flag."""
    unknown = sorted(set(columns or ()) - set(CSV_COLUMNS))
    if unknown:
        raise SpecError(f"--columns: unknown column {unknown[0]!r}; choose from {', '.join(CSV_COLUMNS)}")
    return list(columns or CSV_COLUMNS)


def once_each(answer: AttributionsPublic) -> AttributionsPublic:
    """`--all`: every sample once per method, ranked by score (rank 1 the strongest proponent, the last
    the strongest opponent), as proponents; the opponents' list would repeat it reversed."""
    data = [
        result.model_copy(update={"methods": {
            method: ranking.model_copy(update={"opponents": []}) for method, ranking in result.methods.items()
        }})
        for result in answer.data
    ]
    return answer.model_copy(update={"data": data})


def draw_gallery(
    gallery: Path, opened: GradientStore, pixels: torch.Tensor, answer: AttributionsPublic, files: list[Path]
) -> None:
    """A PNG of each query's top proponents per method."""
    import numpy as np

    from retrac import viz
    from retrac.datasets import ImageDataset

    queries = ImageDataset(pixels, tuple(f"query-{i}" for i in range(len(pixels))), "queries")
    row_of = {sample_id: row for row, sample_id in enumerate(opened.sample_ids)}
    rankings: dict[str, tuple[np.ndarray, np.ndarray]] = {
        method: (
            np.array([[row_of[i.sample_id] for i in r.methods[method].proponents] for r in answer.data]),
            np.array([[i.score for i in r.methods[method].proponents] for r in answer.data]),
        )
        for method in answer.data[0].methods
    }
    viz.gallery(gallery, queries, rankings, opened.plan.dataset, query_labels=[p.name for p in files])
