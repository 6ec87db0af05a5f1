"""The store's layout: its array names, shapes and dtypes, their creation, and the root attributes.

The format is described in docs/store-format.md. `StoreLayout` is the lowest layer of a
`storage.store.GradientStore`: an opened group's attributes read as the store's geometry (rows,
slots, dim, shards, checkpoints) and its arrays by (checkpoint, name). `create_arrays` writes the
empty arrays of a new store; `describe` its root attributes; `open_group` opens a store's group and
refuses any format but `FORMAT` with how to rebuild. Errors: a StoreError naming the store and what
to do (an unreadable spec, a missing array, a shard or checkpoint out of range).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import zarr

from api_schemas import IndexSpec
from retrac.conditions import ClassLabels
from retrac.plan import IndexPlan
from storage.errors import StoreError, UnreachableStoreError
from storage.freshness import fingerprints
from storage.inputs import InputMirrors
from storage.location import BucketLocation, LocalLocation, Location

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams

__all__ = [
    "DELETED_MARK",
    "FORMAT",
    "NOISE_RULE",
    "ROW_ARRAYS",
    "SHARD_ARRAYS",
    "ZARR_DTYPES",
    "StoreLayout",
    "create_arrays",
    "describe",
    "even_shard_size",
    "open_group",
    "read_values",
]

FORMAT = "retrac-store/3"
"""The format this retrac reads and writes (docs/store-format.md, "Format versions")."""
NOISE_RULE = (
    "noise of seed s: torch.randn(image_shape, generator=torch.Generator('cpu').manual_seed(s), "
    "dtype=torch.float32), drawn on the CPU"
)
ROW_ARRAYS = ("projected", "norms", "timesteps", "seeds")
SHARD_ARRAYS = ("digest", "done_at")

DELETED_MARK = "deleted"
"""A file in a store's folder: the store is being deleted. Workers skip it and write nothing more."""

ZARR_DTYPES = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
"""Zarr dtype of the projected array per stored dtype: Zarr and NumPy have no bfloat16, so its 16 bits
are kept as uint16 and viewed as bfloat16 again on reading (`ReadableStore._projected`)."""

ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}  # an all-zero shard still leaves its files
CHUNK_KEYS: ChunkKeyEncodingParams = {"name": "default", "separator": "/"}


class StoreLayout:
    """An opened store's group read as its geometry and arrays. `location` is where it lives
    (`storage.location`); `path` is its folder, or for a store in a bucket its `BucketLocation`
    (printable as its URL, with a `name` too)."""

    def __init__(self, location: Location, group: zarr.Group) -> None:
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.location = location
        self.path: Path | BucketLocation = (
            location.folder if isinstance(location, LocalLocation) else location
        )
        try:
            self.spec = IndexSpec.model_validate(self.attrs["spec"])
        except (KeyError, ValueError) as error:
            raise StoreError(
                f"{self.path.name}: its spec is unreadable ({error}); delete it and create it again"
            ) from error
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self._sample_ids: tuple[str, ...] | None = None  # read and checked once (`ShardedStore`)

    @property
    def num_rows(self) -> int:
        return int(self.attrs["num_rows"])

    @property
    def num_slots(self) -> int:
        return int(self.attrs["num_slots"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def num_checkpoints(self) -> int:
        return len(self.attrs["checkpoints"])

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    @property
    def num_shards(self) -> int:
        return int(self.attrs["num_shards"])

    @property
    def weights(self) -> list[float]:
        return [float(c["weight"]) for c in self.attrs["checkpoints"]]

    @property
    def checkpoint_info(self) -> list[dict[str, Any]]:
        """Per checkpoint: its resolved `path`, `epoch` (or None) and `weight`."""
        return [dict(c) for c in self.attrs["checkpoints"]]

    @property
    def classes(self) -> ClassLabels | None:
        """The label mapping of a class-conditional index (its queries give a label); None if
        unconditional."""
        recorded = self.attrs.get("classes")
        return ClassLabels(recorded) if recorded is not None else None

    @property
    def text_conditional(self) -> bool:
        """Whether the index's model is text-conditional (its queries give a prompt)."""
        return self.attrs.get("text") is not None

    @property
    def slot_kinds(self) -> tuple[str, ...]:
        """What each slot is: "replay", "grid" or "random", in slot order."""
        return tuple(self.attrs["slot_kinds"])

    def size_bytes(self) -> int:
        """Bytes the store takes on disk (or in the bucket)."""
        return sum(self.location.sizes().values())

    def shard_rows(self, shard: int) -> slice:
        """The rows of shard `shard`."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} out of range: the store has shards 0..{self.num_shards - 1}")
        start = shard * self.shard_size
        return slice(start, min(start + self.shard_size, self.num_rows))

    def shard_length(self, shard: int) -> int:
        """Rows in shard `shard` (the last one may be short)."""
        part = self.shard_rows(shard)
        return part.stop - part.start

    def _checkpoint(self, checkpoint: int) -> int:
        if not 0 <= checkpoint < self.num_checkpoints:
            raise StoreError(
                f"checkpoint {checkpoint} out of range: the store has 0..{self.num_checkpoints - 1}"
            )
        return checkpoint

    def _array(self, checkpoint: int, name: str) -> zarr.Array:
        key = (self._checkpoint(checkpoint), name)
        if key not in self._arrays:
            try:
                array = cast(zarr.Array, self._group[f"checkpoints/{checkpoint}/{name}"])
            except KeyError as error:
                raise StoreError(
                    f"{self.path.name}: checkpoint {checkpoint} has no {name} array (damaged or half "
                    "deleted); delete it and create it again"
                ) from error
            self._arrays[key] = array.with_config(ARRAY_CONFIG)
        return self._arrays[key]


def open_group(path: Location) -> zarr.Group:
    """The Zarr group of the store at `path`, if it is one of `FORMAT`; a StoreError otherwise."""
    try:
        group = zarr.open_group(path.zarr_store(), mode="r+", zarr_format=3)
    except UnreachableStoreError:
        raise
    except Exception as error:  # zarr raises several kinds on a damaged group
        raise StoreError(f"{path.name}: cannot open the Zarr group: {error}") from error
    found = group.attrs.get("format")
    if isinstance(found, str) and found.startswith("retrac-store/") and found != FORMAT:
        raise StoreError(
            f"{path.name}: written in format {found}, this retrac reads {FORMAT}; rebuild it: save the "
            "`spec` attribute of its zarr.json to a file, then `retrac index delete STORE`, "
            "`retrac index create --spec FILE STORE` and `retrac index run STORE`"
        )
    if found != FORMAT:
        raise StoreError(
            f"{path.name}: not a {FORMAT} store (format {found!r}); if it is an interrupted create, "
            "delete it and create it again"
        )
    return group


def create_arrays(group: zarr.Group, attrs: dict[str, Any], ids: tuple[str, ...], dtype: str) -> None:
    """The sample ids and every checkpoint's empty arrays of a new store described by `attrs`."""
    rows = int(attrs["num_rows"])
    array = group.create_array("sample_ids", shape=(rows,), dtype=str, chunks=(rows,))
    array[:] = np.asarray(ids, dtype=object)
    slots, dim, shard, shards = attrs["num_slots"], attrs["dim"], attrs["shard_size"], attrs["num_shards"]
    shapes = {
        "projected": ((rows, slots, dim), (shard, slots, dim), ZARR_DTYPES[dtype]),
        "norms": ((rows, slots), (shard, slots), "float32"),
        "timesteps": ((rows, slots), (shard, slots), "int64"),
        "seeds": ((rows, slots), (shard, slots), "int64"),
        "digest": ((shards,), (1,), "uint64"),
        "done_at": ((shards,), (1,), "float64"),
    }
    for c in range(len(attrs["checkpoints"])):
        for name, (shape, chunks, zarr_dtype) in shapes.items():
            group.create_array(
                f"checkpoints/{c}/{name}", shape=shape, chunks=chunks, dtype=zarr_dtype, fill_value=0,
                compressors=None, chunk_key_encoding=CHUNK_KEYS, config=ARRAY_CONFIG,
            )


def describe(plan: IndexPlan, mirrors: InputMirrors) -> dict[str, Any]:
    """The root attributes of a new store for `plan`; inputs read from mirrors are recorded by URL."""
    spec = plan.spec
    dim = plan.row_width()
    shard_size = even_shard_size(plan.num_rows, spec.shard_size)
    kinds = spec.slots.kinds
    return {
        "format": FORMAT,
        "spec": json.loads(spec.model_dump_json()),
        "fingerprints": fingerprints(plan),
        "checkpoints": [
            {"path": mirrors.named(str(c.path)), "epoch": c.epoch, "weight": c.weight}
            for c in plan.checkpoints
        ],
        "num_rows": plan.num_rows,
        "num_slots": len(kinds),
        "dim": dim,
        "shard_size": shard_size,
        "num_shards": math.ceil(plan.num_rows / shard_size),
        "slot_kinds": kinds,
        "prediction_type": plan.prediction_type,
        "loss_weighting": plan.loss_weighting,
        "scheduler": mirrors.named(str(plan.scheduler_folder)),
        "vae": _vae_description(plan, mirrors),
        "noise_rule": NOISE_RULE,
        "classes": plan.classes.to_json() if plan.classes is not None else None,
        "text": _text_description(plan, mirrors),
        "parameters": {
            "count": plan.parameter_count,
            "patterns": list(spec.parameters),
            "base": mirrors.named(str(plan.base)) if plan.base is not None else None,
            "adapters": list(plan.adapters) if plan.adapters is not None else None,
        },
        "torch_version": torch.__version__,
    }


def _vae_description(plan: IndexPlan, mirrors: InputMirrors) -> dict[str, Any] | None:
    """What a latent model's store says of its VAE and latents (None for a pixel-space model); a VAE
    read from a mirror is named by its URL."""
    space = plan.latent_space
    if space is None:
        return None
    return {
        "folder": mirrors.named(str(space.folder)),
        "scaling_factor": space.scaling_factor,
        "shift_factor": space.shift_factor,
        "latent_shape": list(plan.inputs.shape[1:]),
        "encoding": "latents = (mean of the VAE's latent distribution - shift_factor) * scaling_factor",
    }


def _text_description(plan: IndexPlan, mirrors: InputMirrors) -> dict[str, Any] | None:
    """What a text-conditional model's store says of its text encoder (None for any other model); its
    folders in a mirror are named by their URLs."""
    text = plan.text
    if text is None:
        return None
    return {
        "text_encoder": mirrors.named(str(text.encoder_folder)),
        "tokenizer": mirrors.named(str(text.tokenizer_folder)),
        "max_length": text.max_length,
        "hidden_size": text.hidden_size,
        "caption_column": plan.spec.dataset.caption_column,
        "encoding": "encoder_hidden_states = last_hidden_state of the caption padded to max_length",
    }


def even_shard_size(rows: int, most: int) -> int:
    """Rows per shard: as many shards as `most` rows each need, with the rows spread evenly over them,
    so that the last shard is short by fewer rows than there are shards (docs/store-format.md)."""
    return math.ceil(rows / math.ceil(rows / most))


def read_values(array: zarr.Array | zarr.Group, selection: slice = slice(None)) -> np.ndarray:
    """`array[selection]`, which zarr types as any scalar or array: a slice of an array reads an ndarray."""
    return cast(np.ndarray, cast(zarr.Array, array)[selection])
