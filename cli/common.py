"""Pieces several commands share: defaults read from the specs, the dataset flags, spec errors as one line."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from api_schemas import DatasetSpec
from api_schemas.errors import messages

if TYPE_CHECKING:
    from retrac.computers import GradientComputerCache
    from storage.location import Location


def default(model: type[BaseModel], field: str) -> Any:
    """The default of `model.field`: each flag's default lives in its spec or settings class only."""
    return model.model_fields[field].default


def shown(model: type[BaseModel], field: str) -> str:
    """`--help`'s text for a flag that is unset unless typed (so that it overrides a base spec)."""
    return str(default(model, field))


def data_option(base: str) -> Any:
    """`--data`/`--dataset`; unset, the command's `base` dataset is used (shown as the default)."""
    return typer.Option(
        "--data", "--dataset", help="builtin:NAME, image folder, .npy or .npz", show_default=base
    )


def _unless_base(field: str) -> str:
    """`--help`'s default of a dataset flag: DatasetSpec's, unless the base dataset says otherwise."""
    return f"{shown(DatasetSpec, field)} or the base dataset's"


Resolution = Annotated[
    int | None, typer.Option(help="image side in pixels", show_default=_unless_base("resolution"))
]
Channels = Annotated[int | None, typer.Option(help="1 grey or 3 RGB", show_default=_unless_base("channels"))]
Limit = Annotated[int | None, typer.Option(help="use only the first N samples")]
DataSeed = Annotated[
    int | None, typer.Option(help="seed of the source's random choices", show_default=_unless_base("seed"))
]


def typed(**flags: Any) -> dict[str, Any]:
    """The flags the user typed (those not None), by spec field name."""
    return {name: value for name, value in flags.items() if value is not None}


def typed_flags(context: typer.Context, names: Iterable[str]) -> dict[str, Any]:
    """The values of the parameters `names` that the user typed (not left at their defaults)."""
    # compared by name: typer bundles its own click, whose ParameterSource is not click.core's
    return {
        name: context.params[name]
        for name in names
        if name in context.params and _typed(context.get_parameter_source(name))
    }


def _typed(source: Any) -> bool:
    return source is not None and source.name != "DEFAULT"


def absolute_source(source: str) -> str:
    """A dataset source as it should be recorded: built-in names as they are, paths absolute."""
    return source if source.startswith("builtin:") else absolute_text(source)


def absolute_text(path: str) -> str:
    """A model or data path as it should be recorded: an `s3://` URL as it is, a path made absolute."""
    from storage.inputs import is_url

    return path if is_url(path) else str(absolute(path))


def absolute(path: str | Path) -> Path:
    """`path` against the working directory, as typed by the user (user home expanded), made absolute."""
    return Path(path).expanduser().absolute()


def first_error(error: ValidationError) -> str:
    """The first problem of a validation error, as `field.path: message`."""
    return messages(error.errors())[0]


def print_notices(notices: Sequence[str]) -> None:
    """What loading images converted (resized, cropped, channels, ...), as one line on stderr."""
    if notices:
        print("notice: " + "; ".join(notices), file=sys.stderr)


def gradient_computers(device: str | None, threads: int, memory_budget: str | None) -> GradientComputerCache:
    """The gradient computers of an embedded command: on `device` (None: CUDA when available), with
    `threads`, within `--memory-budget` or else the `RETRAC_MEMORY_BUDGET` setting (`retrac.budget`)."""
    from retrac.budget import memory_budget as budget_of
    from retrac.budget import parse_bytes
    from retrac.computers import GradientComputerCache, parse_device
    from worker.settings import ComputeSettings

    chosen = parse_device(device or "auto")
    given = parse_bytes(memory_budget) if memory_budget else ComputeSettings().memory_budget
    budget = budget_of(chosen, None if given is None else int(given))
    return GradientComputerCache(chosen, threads=threads, budget=budget)


def store_location(where: str) -> Location:
    """The store a command names: a folder, or an `s3://bucket/prefix` URL reached with the object-store
    settings (`RETRAC_S3_*`, else the AWS environment variables), as workers reach it; datasets and
    checkpoints at URLs are mirrored by the same settings (`RETRAC_INPUT_CACHE*`)."""
    from storage.location import locate  # here, as every command imports torch only when it runs
    from worker.settings import get_settings

    settings = get_settings()
    settings.use_input_cache()  # inputs at URLs are reached and mirrored by the same settings
    return locate(where, settings.bucket_options())
