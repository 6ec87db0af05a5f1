"""`retrac attribute`: proponents and opponents of query images, from a filled gradient store."""

from __future__ import annotations

import sys
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from api_schemas import Estimator, Method, QuerySpec, Search
from api_schemas.attribution import AttributionsPublic
from api_schemas.specs import DEFAULT_ESTIMATOR, DEFAULT_TOP_K
from cli.common import default, print_notices, store_location, typed_flags
from cli.progress import PhaseBars
from cli.render import CSV_COLUMNS, OutputFormat, attributions
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
    store: Annotated[
        str, typer.Argument(help="a filled store (retrac index create/run): folder or s3://BUCKET/PREFIX")
    ],
    images: Annotated[list[Path], typer.Argument(help="query images (PNG, JPEG or .npy) or folders of them")],
    top_k: Annotated[int, typer.Option(help="proponents and opponents per method")] = DEFAULT_TOP_K,
    rank_all: Annotated[
        bool,
        typer.Option(
            "--all",
            help="rank every training sample once per method (overrides --top-k): rank 1 the strongest "
            "proponent, the last the strongest opponent",
        ),
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
                     show_default="the measured best the store serves (trak under the matched estimator; "
                     "tracin and retrac under the paper's)"),
    ] = None,
    gallery: Annotated[
        Path | None, typer.Option(help="write a PNG of each query's top proponents per method")
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="how to print the results")] = "text",
    as_json: Annotated[
        bool, typer.Option("--json", help="same as --format json: the HTTP API's AttributionsPublic")
    ] = False,
    columns: Annotated[
        list[str] | None,
        typer.Option(
            help=f"--format csv: the columns, repeatable ({', '.join(CSV_COLUMNS)})", show_default="all"
        ),
    ] = None,
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

    import torch

    from retrac import defaults
    from retrac.datasets import Conversions, load_image_file
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
    shape, conversions = opened.spec.dataset, Conversions()
    pixels = torch.stack([
        load_image_file(path, resolution=shape.resolution, channels=shape.channels, conversions=conversions)
        for path in files
    ])
    notices = conversions.notices(len(files), "query images")
    print_notices(notices)
    with PhaseBars() as bars:
        ranked = attribute(
            opened,
            pixels,
            query,
            top_k=opened.num_rows if rank_all else top_k,
            methods=methods,
            on_progress=bars,
        )
    answer = ranked.public(
        index_name(opened.location),
        [str(p) for p in files],
        total_s=time.perf_counter() - started,
        notices=[*notices, *picked],
    )
    attributions(once_each(answer) if rank_all else answer, "json" if as_json else output, chosen)
    print_notices(picked)  # what the defaults chose, once there is an answer
    if gallery is not None:
        draw_gallery(gallery, opened, pixels, answer, files)
        print(f"gallery: {gallery}", file=sys.stderr if output != "text" or as_json else sys.stdout)
    return 0


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
