"""Command-line flags as specs: pure functions from the flags a user typed to an IndexSpec, a QuerySpec
or a TrainSpec, with every validation error named by the flag to change.

A flag table maps each command parameter to the flag a user types (`--grid`) and the spec field it
sets (dotted: `slots.grid`). `spec_from_flags` lays the typed flags over a base (a spec file, the
run's dataset) and validates the whole spec once, so an error names the flag (`--grid: ...`), or the
field of a spec file (`slots.grid: ...`) that no flag sets. A new flag is one line of its table and
one parameter of its command. Nothing here reads a file or loads a model: the commands give the base.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from api_schemas import IndexSpec, ProjectorSpec, QuerySpec, TrainSpec
from api_schemas.errors import Location, dotted, messages
from api_schemas.specs import DEFAULT_KERNEL, DEFAULT_SLOTS, PAPER_SLOTS
from cli.common import absolute_source
from retrac.exceptions import SpecError
from retrac.kernels import MAX_KERNEL_DIM

__all__ = [
    "DATASET_FLAGS", "INDEX_FLAGS", "QUERY_FLAGS", "SLOT_PRESETS", "TRAIN_FLAGS",
    "Flag", "FlagTable", "SlotPreset",
    "checkpoint_fields",
    "index_spec", "query_spec", "spec_from_flags", "train_spec", "validated",
]

SpecT = TypeVar("SpecT", bound=BaseModel)


def _as_is(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Flag:
    """A command-line flag: as typed, the spec field it sets (dotted), and how its value becomes
    the field's."""

    option: str
    field: str
    convert: Callable[[Any], Any] = dataclasses.field(default=_as_is)


FlagTable = Mapping[str, Flag]
"""The flags of one command that set spec fields, by the command's parameter name."""

CHECKPOINT_KEYS = {"epoch": int, "lr": float, "weight": float}
"""What `--checkpoint DIR:key=value,...` may say about a checkpoint."""


def checkpoint_fields(value: str) -> dict[str, Any]:
    """`DIR`, `DIR:epoch=E,lr=LR` or `DIR:weight=W` as CheckpointSpec fields."""
    path, _, options = value.rpartition(":") if "=" in value.rpartition(":")[2] else (value, "", "")
    fields: dict[str, Any] = {"path": path}
    for option in filter(None, options.split(",")):
        key, _, text = option.partition("=")
        if key not in CHECKPOINT_KEYS:
            known = ", ".join(CHECKPOINT_KEYS)
            raise SpecError(f"--checkpoint: unknown checkpoint option {key!r}; use {known}")
        try:
            fields[key] = CHECKPOINT_KEYS[key](text)
        except ValueError:
            raise SpecError(f"--checkpoint: {key}={text!r} is not a number") from None
    return fields


def _checkpoints(values: list[str]) -> list[dict[str, Any]]:
    return [checkpoint_fields(text) for text in values]


DATASET_FLAGS: FlagTable = {
    "data": Flag("--data", "dataset.source"),
    "resolution": Flag("--resolution", "dataset.resolution"),
    "channels": Flag("--channels", "dataset.channels"),
    "limit": Flag("--limit", "dataset.limit"),
    "data_seed": Flag("--data-seed", "dataset.seed"),
}
"""The dataset flags that `train` and `index create` share."""

INDEX_FLAGS: FlagTable = {
    **DATASET_FLAGS,
    "caption_column": Flag("--caption-column", "dataset.caption_column"),
    "run_folder": Flag("--run", "run"),
    "checkpoint": Flag("--checkpoint", "checkpoints", _checkpoints),
    "base": Flag("--base", "base"),
    "parameters": Flag("--parameters", "parameters"),
    "scheduler": Flag("--scheduler", "scheduler"),
    "vae": Flag("--vae", "vae"),
    "train_batch_size": Flag("--train-batch-size", "train_batch_size"),
    "loss": Flag("--loss", "loss"),
    "loss_weighting": Flag("--loss-weighting", "loss_weighting"),
    "replay": Flag("--replay/--no-replay", "slots.replay"),
    "grid": Flag("--grid", "slots.grid"),
    "random": Flag("--random", "slots.random"),
    "slot_seed": Flag("--slot-seed", "slots.seed"),
    "slot_noise": Flag("--slot-noise", "slots.noise"),
    "slot_draws": Flag("--slot-draws", "slots.draws"),
    "projector": Flag("--projector", "projector.kind"),
    "dim": Flag("--dim", "projector.dim"),
    "projector_seed": Flag("--projector-seed", "projector.seed"),
    "output_function": Flag("--output-function", "output_function"),
    "kernel": Flag("--kernel", "kernel", lambda on: {} if on else None),
    "kernel_ridge": Flag("--kernel-ridge", "kernel.ridge"),
    "dtype": Flag("--dtype", "dtype"),
    "batch_size": Flag("--batch-size", "batch_size"),
    "shard_size": Flag("--shard-size", "shard_size"),
}
"""`retrac index create`'s flags."""

QUERY_FLAGS: FlagTable = {
    name: Flag(f"--{name}", name)
    for name in ("timesteps", "draws", "seed", "estimator", "search", "label", "prompt")
}
"""`retrac attribute`'s query flags (`eval generate` uses some of them)."""

TRAIN_FLAGS: FlagTable = {
    **DATASET_FLAGS,
    **{name: Flag(f"--{name.replace('_', '-')}", name) for name in (
        "preset", "loss", "epochs", "batch_size", "lr", "save_every", "seed", "beta_schedule",
        "prediction_type",
        "loss_weighting",
    )},
    "timesteps": Flag("--timesteps", "num_timesteps"),
    "class_conditional": Flag("--class-conditional/--unconditional", "class_conditional"),
}
"""`retrac train`'s flags."""


def spec_from_flags(
    model: type[SpecT], table: FlagTable, flags: Mapping[str, Any], base: Mapping[str, Any] | None = None
) -> SpecT:
    """`model` from `base`'s fields with the typed `flags` (by parameter name, None: not typed) laid over."""
    fields = copy.deepcopy(dict(base or {}))
    for parameter, value in flags.items():
        if value is not None:
            *parents, name = table[parameter].field.split(".")
            inner = fields
            for part in parents:
                inner = inner.setdefault(part, {})
            inner[name] = table[parameter].convert(value)
    return validated(model, fields, table)


def validated(model: type[SpecT], fields: Mapping[str, Any], table: FlagTable | None = None) -> SpecT:
    """`model` built from `fields`, or a SpecError naming the flag of `table` (else the field) to change."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise SpecError(messages(error.errors(), _namer(table or {}))[0]) from error


def _namer(table: FlagTable) -> Callable[[Location], str]:
    """A location's name: the flag that sets it or the field holding it (`--checkpoint` for
    `checkpoints.0.path`), else the field's dotted path."""
    options = {tuple(flag.field.split(".")): flag.option for flag in table.values()}

    def name(location: Location) -> str:
        parts = tuple(str(part) for part in location)
        for end in range(len(parts), 0, -1):
            if parts[:end] in options:
                return options[parts[:end]]
        return dotted(location)

    return name


SlotPreset = Literal["default", "paper"]
SLOT_PRESETS = {"default": DEFAULT_SLOTS, "paper": PAPER_SLOTS}
"""`index create --preset`: the slots the slot flags start from (`api_schemas.specs.DEFAULT_SLOTS`), or
the paper's, the replayed step alone, which the slot flags may not change."""


def index_spec(flags: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> IndexSpec:
    """`retrac index create`'s spec: `base` (a spec file's fields, or the run's or model's dataset) with
    the typed flags laid over; a dataset is needed from one of them. The slots are the `preset`'s
    (default: the default's), unless a spec file gives its own and no preset is typed. The kernel is
    `DEFAULT_KERNEL` unless typed or in the spec file: none under the paper's preset, or for rows too
    wide to have one (the identity projector, k > `MAX_KERNEL_DIM`)."""
    flags = dict(flags)
    preset = flags.pop("preset", None)
    fields = copy.deepcopy(dict(base or {}))
    slot_flags = sorted(
        INDEX_FLAGS[name].option for name in flags if INDEX_FLAGS[name].field.startswith("slots.")
    )
    if preset == "paper" and slot_flags:
        dropped = ", ".join(slot_flags)
        raise SpecError(f"--preset paper fixes the slots (the replayed step alone); drop {dropped}")
    if preset is not None or "slots" not in fields:
        fields["slots"] = SLOT_PRESETS[preset or "default"].model_dump()
    if "kernel" not in flags and "kernel" not in fields:
        wanted = preset != "paper" and _narrow(flags, fields)
        fields["kernel"] = DEFAULT_KERNEL.model_dump() if wanted else None
    if flags.get("kernel_ridge") is not None and not flags.get("kernel") and fields.get("kernel") is None:
        raise SpecError("--kernel-ridge: the kernel's ridge needs --kernel")
    if flags.get("data") is not None:
        fields.get("dataset", {}).pop("limit", None)  # a base's sample limit belongs to its own source
    if flags.get("data") is None and "source" not in fields.get("dataset", {}):
        raise SpecError("--data: give the dataset (or --run, whose dataset is used)")
    return spec_from_flags(IndexSpec, INDEX_FLAGS, flags, fields)


def _narrow(flags: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    """Whether the projector the flags and base choose gives rows narrow enough for a kernel."""
    base, default = fields.get("projector", {}), ProjectorSpec()
    kind = flags.get("projector") or base.get("kind", default.kind)
    dim = flags.get("dim") or base.get("dim", default.dim)
    return kind != "identity" and dim <= MAX_KERNEL_DIM


def query_spec(flags: Mapping[str, Any]) -> QuerySpec:
    """A query's spec from its typed flags: the matched estimator takes those not typed from the store."""
    return spec_from_flags(QuerySpec, QUERY_FLAGS, flags)


def train_spec(flags: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> TrainSpec:
    """`retrac train`'s spec: `base` (a recipe under a config file's fields) with the typed flags laid
    over; the dataset is builtin:digits unless one of them says otherwise."""
    fields = copy.deepcopy(dict(base or {}))
    fields.setdefault("dataset", {}).setdefault("source", "builtin:digits")
    spec = spec_from_flags(TrainSpec, TRAIN_FLAGS, flags, fields)
    source = absolute_source(spec.dataset.source)  # the run records a path that resolves from anywhere
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"source": source})})
