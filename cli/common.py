"""Pieces several commands share: the dataset flags, and spec validation errors as one line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from api_schemas import DatasetSpec
from retrac.exceptions import SpecError

if TYPE_CHECKING:
    from storage.location import Location

DATASET_FLAGS = {"data": "source", "resolution": "resolution", "channels": "channels", "limit": "limit", "data_seed": "seed"}
"""Dataset flags (argparse dests) and the DatasetSpec fields they set."""

SpecT = TypeVar("SpecT", bound=BaseModel)


def add_dataset_arguments(parser: argparse.ArgumentParser, *, default: str) -> None:
    """The dataset flags; an unset flag keeps `default` (said in the help), i.e. the command's base."""
    parser.add_argument("--data", "--dataset", dest="data", help=f"builtin:NAME, image folder, .npy or .npz (default: {default})")
    parser.add_argument("--resolution", type=int, help="image side in pixels")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 grey or 3 RGB")
    parser.add_argument("--limit", type=int, help="use only the first N samples")
    parser.add_argument("--data-seed", type=int, help="seed of the source's random choices")


def given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """The flags of `names` the user typed, renamed to spec fields."""
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag) is not None}


def dataset_spec(args: argparse.Namespace, base: dict[str, Any] | None = None) -> DatasetSpec:
    """`base` (default: builtin:digits with DatasetSpec's defaults) with the typed dataset flags laid over it.

    A file or folder source is made absolute, so a run or store that records it works from any directory.
    """
    fields = {"source": "builtin:digits", **(base or {}), **given(args, DATASET_FLAGS)}
    return validated(DatasetSpec, {**fields, "source": absolute_source(fields["source"])})


def absolute_source(source: str) -> str:
    """A dataset source as it should be recorded: built-in names as they are, paths absolute."""
    return source if source.startswith("builtin:") else str(absolute(source))


def absolute(path: str | Path) -> Path:
    """`path` against the working directory, as typed by the user (user home expanded), made absolute."""
    return Path(path).expanduser().absolute()


def store_location(where: str) -> Location:
    """The store a command names: a folder, or an `s3://bucket/prefix` URL reached with the object-store
    settings (`RETRAC_S3_*`, else the AWS environment variables), as workers reach it."""
    from storage.location import locate  # here, as every command imports torch only when it runs
    from worker.settings import get_settings

    return locate(where, get_settings().bucket_options())


def validated(model: type[SpecT], fields: dict[str, Any]) -> SpecT:
    """`model` built from `fields`, or a SpecError naming the first bad field."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise SpecError(first_error(error)) from error


def first_error(error: ValidationError) -> str:
    """The first problem of a validation error, as `field.path: message`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
