"""The gradient store: one Zarr (v3 format) group per index, self-describing, written shard by shard.

Layout (a plain `zarr.open_group` reader finds everything; N rows, S slots, k projected dims):

    zarr.json attributes     format, a uid, the full IndexSpec, the root its paths resolve in and
                             the data root its dataset files must stay in,
                             fingerprints of the checkpoints, dataset, replay record and schedule
                             (`storage.freshness`),
                             the resolved checkpoints (path, epoch, weight), num_rows, num_slots,
                             dim, shard_size, num_shards, slot_kinds, the noise rule that turns
                             a stored seed into noise, and `classes`: a class-conditional index's
                             label mapping (class name -> the integer the model takes), else null,
                             and `text`: a text-conditional index's text encoder and tokenizer
                             (folders, padded length, width), else null
    sample_ids                          (N,)       string
    latents                             (N, c, h, w) float32: a latent model's training latents, encoded
                                                   once at create (`retrac.latents`); their xxh3_64 in
                                                   the `latents_digest` attribute; absent for pixel models
    checkpoints/<c>/projected           (N, S, k)  the spec's dtype: float16, float32, or bfloat16
                                                   held as its raw bits in uint16 (`ZARR_DTYPES`)
    checkpoints/<c>/norms               (N, S)     float32: exact L2 norms before projection
    checkpoints/<c>/timesteps           (N, S)     int64
    checkpoints/<c>/seeds               (N, S)     int64: noise seeds
    checkpoints/<c>/digest              (shards,)  uint64: xxh3_64 of the shard's bytes (see `_digest`)
    checkpoints/<c>/done_at             (shards,)  float64: the done mark, unix time; 0 = not done

Shard i is rows `[i * shard_size, (i + 1) * shard_size)`. The stored `shard_size` is the spec's
evened out over the rows (`_even_shard_size`): zarr writes every chunk at full size, so a short last
shard would be padded on disk; evened out, the padding is under one row per shard. Each shard is
exactly one chunk of every per-row array and one chunk of `digest` and `done_at`, so the one task that
computes it is the only writer of every file it touches (zarr loses data when two writers share a chunk or
shard file). A task writes the data, then the digest, then the done mark; a shard counts as done only when its
mark is set and every one of its chunk files is present with the exact size of an uncompressed chunk, so a
half-written, deleted or truncated shard is pending again. `status(verify=True)` also rereads the bytes
against the digest, and marks a damaged shard not done so that the next run recomputes exactly it. Every read
that scores (a resident load or a streamed chunk) checks each shard's bytes against its digest and refuses a
damaged store with a DamagedStoreError. Nothing is compressed: zstd saves ~9% on projected gradients
and slows every scan.

The same layout lives in a folder or under an `s3://bucket/prefix` (`storage.location`): each chunk
file is then one object, written whole by one PUT, so the rules above hold unchanged in a bucket.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import xxhash
import zarr

from api_schemas import IndexSpec
from retrac.conditions import ClassLabels
from retrac.exceptions import RetracError
from retrac.gradients import num_parameters
from retrac.plan import IndexPlan, Rows, pin_checkpoints
from retrac.scoring import SCAN_ROWS, RowChunk
from storage.errors import (
    DamagedStoreError,
    DeletedStoreError,
    IncompleteStoreError,
    StaleStoreError,
    StoreError,
    UnreachableStoreError,
)
from storage.freshness import REBUILD, changes, fingerprints
from storage.inputs import InputMirrors, current_inputs, is_url
from storage.location import ASIDE_PREFIX, BucketLocation, LocalLocation, Location, locate

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams

FORMAT = "retrac-store/2"
"""Format 2: xxh3_64 digests (three times crc32's speed, so checking every scanned chunk costs ~5% of a
cold scan) and evened-out shards. Format 1 stores are refused with how to rebuild them."""
NOISE_RULE = (
    "noise of seed s: torch.randn(image_shape, generator=torch.Generator('cpu').manual_seed(s), "
    "dtype=torch.float32), drawn on the CPU"
)
ROW_ARRAYS = ("projected", "norms", "timesteps", "seeds")
SHARD_ARRAYS = ("digest", "done_at")
DEFAULT_RESIDENT_BYTES = 2 << 30
"""Bytes of projected gradients and norms an opened store keeps in memory after a first full read
(float16 rows as float32 when all of them fit so, `GradientStore._widens`).
Reading Zarr back is 30-40x slower than scanning memory (bench/store.py), so a serving process keeps an
index resident when it fits, and streams only what does not."""

RESIDENT_STEP = 16384
"""Rows per scan step when every scanned checkpoint is resident: no copy is made, and larger steps
spend less on per-step work (allocations, top-k merges)."""

DELETED_MARK = "deleted"
"""A file in a store's folder: the store is being deleted. Workers skip it and write nothing more."""

ZARR_DTYPES = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
"""Zarr dtype of the projected array per stored dtype: Zarr and NumPy have no bfloat16, so its 16 bits
are kept as uint16 and viewed as bfloat16 again on reading (`_projected`); the spec says which."""

_ARRAY_CONFIG: ArrayConfigParams = {
    "write_empty_chunks": True
}  # an all-zero shard must still leave its files behind
_CHUNK_KEYS: ChunkKeyEncodingParams = {"name": "default", "separator": "/"}


@dataclass(frozen=True)
class CheckpointStatus:
    """How far one checkpoint is: shards and rows done of the total."""

    checkpoint: int
    done_shards: int
    total_shards: int
    done_rows: int
    total_rows: int

    @property
    def complete(self) -> bool:
        return self.done_shards == self.total_shards


@dataclass(frozen=True)
class StoreStatus:
    """Per-checkpoint progress of a store, and totals over all checkpoints."""

    checkpoints: tuple[CheckpointStatus, ...]

    @property
    def done_shards(self) -> int:
        return sum(c.done_shards for c in self.checkpoints)

    @property
    def total_shards(self) -> int:
        return sum(c.total_shards for c in self.checkpoints)

    @property
    def done_rows(self) -> int:
        return sum(c.done_rows for c in self.checkpoints)

    @property
    def total_rows(self) -> int:
        return sum(c.total_rows for c in self.checkpoints)

    @property
    def complete(self) -> bool:
        return all(c.complete for c in self.checkpoints)


class GradientStore:
    """An index in a folder or a bucket. Build one with `create`, reopen it with `open`; never
    construct directly. `location` is where it lives (`storage.location`); `path` is its folder, or
    for a store in a bucket its `BucketLocation` (printable as its URL, with a `name` too)."""

    def __init__(
        self, location: Location, group: zarr.Group, *, root: Path | None, resident_bytes: int
    ) -> None:
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        recorded = self.attrs.get("root")
        self.location, self.resident_bytes = location, resident_bytes
        self.path: Path | BucketLocation = (
            location.folder if isinstance(location, LocalLocation) else location
        )
        self.root = root if root is not None else (Path(recorded) if recorded else None)
        try:
            self.spec = IndexSpec.model_validate(self.attrs["spec"])
        except (KeyError, ValueError) as error:
            raise StoreError(
                f"{self.path.name}: its spec is unreadable ({error}); delete it and create it again"
            ) from error
        self._plan: IndexPlan | None = None
        self._inputs: InputMirrors | None = None
        """The mirrors of the plan's inputs at URLs, leased while this store may read them: until the
        store is dropped (a long-lived process drops it when it reopens a changed store)."""
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self._sample_ids: tuple[str, ...] | None = None
        self._resident: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._resident_lock = threading.Lock()  # one load per checkpoint, also under concurrent queries

    # --- creating and opening -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path | Location,
        spec: IndexSpec,
        *,
        root: Path | None = None,
        data_root: Path | None = None,
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    ) -> GradientStore:
        """Write an empty store for `spec` at `path` (nothing done yet) and return it opened.

        With `data_root`, the dataset's files must lie inside it, now and whenever the store is
        reopened (it is recorded), so a link added to an image folder later cannot lead outside.

        An existing store with the same spec is reopened (and checked); one with another spec, or any
        other non-empty folder, is refused rather than overwritten. The spec is recorded with its run's
        checkpoints written in (`pin_checkpoints`), so the run may go on training.
        """
        path = locate(path)
        requested, spec = spec, pin_checkpoints(spec, root)
        if path.has("zarr.json"):
            existing = cls.open(path, root=root, check=False, resident_bytes=resident_bytes)
            if existing.spec not in (requested, spec):
                raise StoreError(
                    f"{path.name} already holds a different index; choose another path or delete it"
                )
            existing.check()
            return existing
        if not path.is_empty():
            raise StoreError(f"{path.name} exists and is not a retrac store; choose another path")
        plan, mirrors = _resolve(spec, root, path, data_root=data_root)
        with mirrors.released_on_error():
            store = cls._created(path, spec, plan, mirrors, root, data_root, resident_bytes)
        store._plan, store._inputs = plan, mirrors
        return store

    @classmethod
    def _created(
        cls,
        path: Location,
        spec: IndexSpec,
        plan: IndexPlan,
        mirrors: InputMirrors,
        root: Path | None,
        data_root: Path | None,
        resident_bytes: int,
    ) -> GradientStore:
        """`create`'s writing: the group, its arrays and its attributes, last."""
        attrs = {
            **_describe(plan, mirrors),
            "root": str(Path(root).resolve()) if root is not None else None,
            "data_root": str(Path(data_root).resolve()) if data_root is not None else None,
            "uid": uuid.uuid4().hex,  # tells this store from a later one at the same path
        }
        group = zarr.open_group(path.zarr_store(), mode="w-", zarr_format=3)
        ids = group.create_array("sample_ids", shape=(plan.num_rows,), dtype=str, chunks=(plan.num_rows,))
        ids[:] = np.asarray(plan.dataset.ids, dtype=object)
        if plan.latent_space is not None:
            attrs["latents_digest"] = _write_latents(group, plan.inputs, attrs["shard_size"])
        rows, slots, dim, shard = plan.num_rows, attrs["num_slots"], attrs["dim"], attrs["shard_size"]
        for c in range(len(plan.checkpoints)):
            shapes = {
                "projected": ((rows, slots, dim), (shard, slots, dim), ZARR_DTYPES[spec.dtype]),
                "norms": ((rows, slots), (shard, slots), "float32"),
                "timesteps": ((rows, slots), (shard, slots), "int64"),
                "seeds": ((rows, slots), (shard, slots), "int64"),
                "digest": ((attrs["num_shards"],), (1,), "uint64"),
                "done_at": ((attrs["num_shards"],), (1,), "float64"),
            }
            for name, (shape, chunks, dtype) in shapes.items():
                group.create_array(
                    f"checkpoints/{c}/{name}",
                    shape=shape,
                    chunks=chunks,
                    dtype=dtype,
                    fill_value=0,
                    compressors=None,
                    chunk_key_encoding=_CHUNK_KEYS,
                    config=_ARRAY_CONFIG,
                )
        group.attrs.update(attrs)  # last: a folder without `format` is an unfinished create, not a store
        return cls(path, group, root=root, resident_bytes=resident_bytes)

    @classmethod
    def open(
        cls,
        path: str | Path | Location,
        *,
        root: Path | None = None,
        check: bool = True,
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    ) -> GradientStore:
        """Open the store at `path`. With `check`, a StaleStoreError if its inputs changed since.

        Paths in the spec resolve inside `root`, by default the root the store was created with, so a
        worker opens a service's store without knowing the service's folders.
        """
        path = locate(path)
        if not path.has("zarr.json"):
            raise StoreError(
                f"{path.name} is not a retrac store (no zarr.json); create one with `retrac index create`"
            )
        if path.has(DELETED_MARK):
            raise DeletedStoreError(
                f"{path.name} is being deleted, or its deletion was interrupted; finish it with "
                f"`retrac index delete {path}`"
            )
        try:
            group = zarr.open_group(path.zarr_store(), mode="r+", zarr_format=3)
        except UnreachableStoreError:
            raise
        except Exception as error:  # zarr raises several kinds on a damaged group
            raise StoreError(f"{path.name}: cannot open the Zarr group: {error}") from error
        found = group.attrs.get("format")
        if isinstance(found, str) and found.startswith("retrac-store/") and found != FORMAT:
            raise StoreError(
                f"{path.name}: written in format {found}, this retrac reads {FORMAT}; delete it and "
                "create it again with `retrac index create`"
            )
        if found != FORMAT:
            raise StoreError(
                f"{path.name}: not a {FORMAT} store (format {found!r}); if it is an interrupted create, "
                "delete it and create it again"
            )
        store = cls(path, group, root=root, resident_bytes=resident_bytes)
        if check:
            store.check()
        return store

    def check(self) -> None:
        """A StaleStoreError naming what changed, if the checkpoints, data, record or schedule did."""
        data_root = Path(self.attrs["data_root"]) if self.attrs.get("data_root") else None
        plan, mirrors = _resolve(self.spec, self.root, self.path, data_root=data_root, stale=True)
        with mirrors.released_on_error():
            changed = mirrors.named("; ".join(changes(self.attrs["fingerprints"], plan, self.sample_ids)))
            if changed:
                raise StaleStoreError(
                    f"{self.path.name} is stale: {changed}; restore the input, or {REBUILD}"
                )
            self._plan = plan if plan.latent_space is None else plan.with_latents(self._stored_latents())
        previous, self._inputs = self._inputs, mirrors
        if previous is not None:
            previous.release()

    def _stored_latents(self) -> torch.Tensor:
        """The latents written at create, checked against their digest: every worker computes from
        these same bytes, so a shard is the same whichever machine (and VAE kernel) computes it."""
        try:
            latents = np.asarray(_values(self._group["latents"]), dtype=np.float32)
        except KeyError as error:
            raise StoreError(
                f"{self.path.name}: a latent model's store without its latents; {REBUILD}"
            ) from error
        if _digest([latents]) != int(self.attrs.get("latents_digest", -1)):
            raise DamagedStoreError(
                f"{self.path.name}: its stored latents do not match their digest (damaged); {REBUILD}"
            )
        return torch.from_numpy(latents)

    # --- what the store holds -------------------------------------------------------------------------

    @property
    def plan(self) -> IndexPlan:
        """The resolved plan (dataset loaded, checkpoints checked), resolved and checked on first use:
        a store opened with `check=False` still never computes from changed inputs."""
        if self._plan is None:
            self.check()
        return self._plan  # type: ignore[return-value]

    @property
    def sample_ids(self) -> tuple[str, ...]:
        if self._sample_ids is None:
            self._sample_ids = tuple(str(i) for i in _values(self._group["sample_ids"]))
        return self._sample_ids

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

    def signature(self) -> tuple[Any, ...]:
        """The stamp of the group's metadata (`Location.stamp`) and (inode, mtime, size) of every
        checkpoint, VAE, text encoder and tokenizer file: cheap to read on every use, and different after the
        store is deleted and recreated or a checkpoint or the VAE replaced. Long-lived processes compare it to
        reopen (and recheck) a store instead of using it stale."""
        inputs = current_inputs()
        folders = [c["path"] for c in self.checkpoint_info]
        folders += [self.attrs["vae"]["folder"]] if self.attrs.get("vae") else []
        text = self.attrs.get("text")
        folders += [text["text_encoder"], text["tokenizer"]] if text else []
        stamps = [  # at a URL: the ETags of its objects, one listing
            inputs.stamp(path) if is_url(path) else tuple(_stat(f) for f in sorted(Path(path).rglob("*")))
            for path in folders
        ]
        return (self.location.stamp("zarr.json"), *stamps)

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

    def timesteps(self, checkpoint: int) -> np.ndarray:
        """Stored slot timesteps `(N, S)` int64 of one checkpoint (zeros where not done)."""
        return _values(self._array(checkpoint, "timesteps"))

    def timesteps_of(self, checkpoint: int, rows: np.ndarray) -> np.ndarray:
        """Stored slot timesteps `(len(rows), S)` int64 of the given rows only (sorted, unique)."""
        if rows.size == 0:
            return np.zeros((0, self.num_slots), dtype=np.int64)
        return cast(
            np.ndarray, self._array(checkpoint, "timesteps").get_orthogonal_selection((rows, slice(None)))
        )

    def seeds(self, checkpoint: int) -> np.ndarray:
        """Stored slot noise seeds `(N, S)` int64 of one checkpoint (zeros where not done)."""
        return _values(self._array(checkpoint, "seeds"))

    def norms(self, checkpoint: int) -> np.ndarray:
        """Stored exact gradient norms `(N, S)` float32 of one checkpoint (zeros where not done)."""
        return _values(self._array(checkpoint, "norms"))

    # --- writing --------------------------------------------------------------------------------------

    def write_shard(self, checkpoint: int, shard: int, rows: Rows) -> None:
        """Store the computed rows of one shard: data, then digest, then the done mark."""
        part = self.shard_rows(shard)
        n = part.stop - part.start
        projected = rows.projected.detach().cpu().to(getattr(torch, self.spec.dtype))
        bits = projected.view(torch.uint16) if self.spec.dtype == "bfloat16" else projected  # ZARR_DTYPES
        data = {
            "projected": bits.numpy(),
            "norms": rows.norms.detach().cpu().to(torch.float32).numpy(),
            "timesteps": rows.timesteps.detach().cpu().to(torch.int64).numpy(),
            "seeds": rows.seeds.detach().cpu().to(torch.int64).numpy(),
        }
        expected = {"projected": (n, self.num_slots, self.dim), "norms": (n, self.num_slots)}
        for name, values in data.items():
            shape = expected.get(name, (n, self.num_slots))
            if values.shape != shape:
                raise StoreError(f"shard {shard}: {name} has shape {values.shape}, the store expects {shape}")
        if not np.isfinite(data["norms"]).all():
            raise StoreError(f"checkpoint {checkpoint} shard {shard}: non-finite gradient norms")
        if not bool(torch.isfinite(projected).all()):
            overflow = bool(torch.isfinite(rows.projected).all())  # finite in float32: the stored dtype's range
            advice = f" beyond {self.spec.dtype}'s range; index with dtype float32 or bfloat16" if overflow else ""
            raise StoreError(f"checkpoint {checkpoint} shard {shard}: non-finite projected gradients{advice}")
        self.require_live()
        done = self._array(checkpoint, "done_at")
        done[shard] = 0.0  # a rewrite is pending until its new mark
        for name, values in data.items():
            self._array(checkpoint, name)[part] = values
        self._array(checkpoint, "digest")[shard] = _digest(data.values())
        done[shard] = time.time()

    def require_live(self) -> None:
        """A DeletedStoreError if the store is being deleted, or was replaced by another at its path:
        a worker that opened it before must not write into what is left, or into the new one."""
        if self.location.has(DELETED_MARK):
            raise DeletedStoreError(f"{self.path.name} is being deleted; nothing more is written to it")
        try:
            uid = json.loads(self.location.read("zarr.json") or b"")["attributes"].get("uid")
        except (ValueError, KeyError):
            uid = None
        if uid != self.attrs.get("uid"):
            raise DeletedStoreError(f"{self.path.name} was deleted since it was opened; nothing is written")

    # --- status ---------------------------------------------------------------------------------------

    def done_marks(self, checkpoint: int) -> np.ndarray:
        """Done-mark times `(shards,)` of one checkpoint, 0 where not done or unreadable."""
        array = self._array(checkpoint, "done_at")
        try:
            return np.asarray(array[:], dtype=np.float64)
        except UnreachableStoreError:  # an outage is no damage: never read as "not done"
            raise
        except Exception:  # one damaged mark must not hide the others
            return np.array([_read_or_zero(array, i) for i in range(self.num_shards)], dtype=np.float64)

    def done_shards(self, checkpoint: int, *, verify: bool = False) -> np.ndarray:
        """Which shards `(shards,)` bool of one checkpoint are done: marked, and every chunk file intact.

        With `verify`, each done shard's bytes are also reread and checked against its digest.
        """
        marks = self.done_marks(checkpoint) > 0
        sizes = self.location.sizes(f"checkpoints/{checkpoint}") if marks.any() else {}  # one listing
        intact = [marks[i] and self._files_intact(checkpoint, i, sizes.get) for i in range(len(marks))]
        done = np.array(intact, dtype=bool)
        if verify:
            for shard in np.flatnonzero(done):
                if not self._digest_matches(checkpoint, int(shard)):
                    done[shard] = False
                    self._array(checkpoint, "done_at")[int(shard)] = 0.0  # `index run` recomputes it
        return done

    def is_done(self, checkpoint: int, shard: int) -> bool:
        """Whether one shard is done (its mark set and its files intact)."""
        self.shard_rows(shard)
        return _read_or_zero(self._array(checkpoint, "done_at"), shard) > 0 and self._files_intact(
            checkpoint, shard, self.location.size
        )

    def status(self, *, verify: bool = False) -> StoreStatus:
        """Per-checkpoint done/total shards and rows (see `done_shards`)."""
        sizes = np.array([self.shard_length(i) for i in range(self.num_shards)])
        result = []
        for c in range(self.num_checkpoints):
            done = self.done_shards(c, verify=verify)
            result.append(
                CheckpointStatus(
                    checkpoint=c,
                    done_shards=int(done.sum()),
                    total_shards=self.num_shards,
                    done_rows=int(sizes[done].sum()),
                    total_rows=self.num_rows,
                )
            )
        return StoreStatus(tuple(result))

    def pending(self, *, verify: bool = False) -> list[tuple[int, int]]:
        """(checkpoint, shard) of every shard not done, checkpoint by checkpoint."""
        return [
            (c, int(shard))
            for c in range(self.num_checkpoints)
            for shard in np.flatnonzero(~self.done_shards(c, verify=verify))
        ]

    # --- reading for scans ----------------------------------------------------------------------------

    def chunks(
        self, checkpoints: Sequence[int], rows_per_chunk: int = SCAN_ROWS
    ) -> Iterator[tuple[int, list[RowChunk]]]:
        """(first row, one RowChunk per checkpoint) over all rows, as `retrac.scoring.scan` takes them.

        Projected rows stay in the store's dtype (the scan converts them block by block). Chunks are
        whole shards, `rows_per_chunk` or more: what is read from disk per step, and so the memory a
        scan needs beyond the resident checkpoints (served as views, at least `RESIDENT_STEP` rows).
        An IncompleteStoreError if any asked checkpoint has shards not done.
        """
        chosen = [self._checkpoint(c) for c in checkpoints]
        for c in (c for c in chosen if c not in self._resident):  # resident ones were complete when read
            missing = int((~self.done_shards(c)).sum())
            if missing:
                raise IncompleteStoreError(
                    f"{self.path.name}: checkpoint {c} has {missing} of {self.num_shards} shards not done; "
                    "finish indexing with `retrac index run`"
                )
        resident = {c: self._load_resident(c) for c in chosen}
        if all(r is not None for r in resident.values()):  # views of memory: fewer, larger steps
            rows_per_chunk = max(rows_per_chunk, RESIDENT_STEP)
        step = max(1, math.ceil(rows_per_chunk / self.shard_size)) * self.shard_size
        for start in range(0, self.num_rows, step):
            part = slice(start, min(start + step, self.num_rows))
            yield start, [self._rows(c, part, resident[c]) for c in chosen]

    def rows_at(self, checkpoint: int, rows: np.ndarray) -> RowChunk:
        """Projected rows and norms of the given `rows` (sorted, unique) of one checkpoint, as a scan
        reads them: from resident memory, or by whole shards, each checked against its digest."""
        resident = self._load_resident(self._checkpoint(checkpoint))
        if resident is not None:
            return RowChunk(self._projected(resident[0][rows]), torch.from_numpy(resident[1][rows]))
        projected, norms = [], []
        shards = rows // self.shard_size
        for shard in np.unique(shards):
            part = self.shard_rows(int(shard))
            stored = self._verified(checkpoint, part)
            local = rows[shards == shard] - part.start
            projected.append(stored[0][local])
            norms.append(stored[1][local])
        return RowChunk(self._projected(np.concatenate(projected)), torch.from_numpy(np.concatenate(norms)))

    def shard_digests(self, checkpoint: int) -> np.ndarray:
        """The digests `(shards,)` uint64 of one checkpoint's shards, as their done marks hold them."""
        return np.asarray(self._array(checkpoint, "digest")[:], dtype=np.uint64)

    def _rows(self, checkpoint: int, part: slice, resident: tuple[np.ndarray, np.ndarray] | None) -> RowChunk:
        if resident is not None:
            projected, norms = resident[0][part], resident[1][part]
        else:
            projected, norms = self._verified(checkpoint, part)
        return RowChunk(self._projected(projected), torch.from_numpy(norms))

    def _projected(self, stored: np.ndarray) -> torch.Tensor:
        """Stored projected rows as a tensor of the spec's dtype, sharing their memory (bfloat16 is
        stored as its bits, `ZARR_DTYPES`)."""
        tensor = torch.from_numpy(stored)
        return tensor.view(torch.bfloat16) if self.spec.dtype == "bfloat16" else tensor

    def _verified(self, checkpoint: int, part: slice) -> tuple[np.ndarray, np.ndarray]:
        """Projected rows and norms of whole shards `part`, each shard checked against its digest.

        The digest covers all four per-row arrays, so the (small) timesteps and seeds are read too.
        A DamagedStoreError naming the first damaged shard and how to rebuild it.
        """
        arrays = [_values(self._array(checkpoint, name), part) for name in ROW_ARRAYS]
        first = part.start // self.shard_size
        count = math.ceil((part.stop - part.start) / self.shard_size)
        digests = _values(self._array(checkpoint, "digest"), slice(first, first + count))
        for offset, expected in enumerate(digests):
            shard = first + offset
            rows = self.shard_rows(shard)
            local = slice(rows.start - part.start, rows.stop - part.start)
            if _digest([a[local] for a in arrays]) != int(expected):
                raise DamagedStoreError(
                    f"index {self.path.name!r}: checkpoint {checkpoint} shard {shard} (rows {rows.start}.."
                    f"{rows.stop - 1}) does not match its done mark's digest; rebuild it with "
                    "`retrac index status --verify STORE` then `retrac index run STORE`"
                )
        return arrays[0], arrays[1]

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the checkpoints held in memory for scans (at most `resident_bytes`)."""
        with self._resident_lock:
            return sum(p.nbytes + n.nbytes for p, n in self._resident.values())

    def _load_resident(self, checkpoint: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The checkpoint's arrays in memory, read once, if they fit what is left of the budget;
        float16 rows widened to float32 if every checkpoint's float32 copy fits (`_widens`)."""
        with self._resident_lock:
            if checkpoint in self._resident:
                return self._resident[checkpoint]
            projected, norms = (self._array(checkpoint, name) for name in ("projected", "norms"))
            widen = self._widens()
            needed = projected.nbytes * (2 if widen else 1) + norms.nbytes
            used = sum(p.nbytes + n.nbytes for p, n in self._resident.values())
            if used + needed > self.resident_bytes:
                return None
            loaded = self._verified(checkpoint, slice(0, self.num_rows))
            if widen:
                loaded = (loaded[0].astype(np.float32), loaded[1])
            self._resident[checkpoint] = loaded
            return loaded

    def _widens(self) -> bool:
        """Whether resident float16 rows are kept as float32 (exactly the same numbers): a scan then
        multiplies them uncopied, 1.8x faster for one query than converting them block by block
        (bench/scale.py), at twice the memory, so only when all checkpoints fit the budget so."""
        if self.spec.dtype != "float16":
            return False
        per_checkpoint = self.num_rows * self.num_slots * (self.dim * 4 + 4)
        return per_checkpoint * self.num_checkpoints <= self.resident_bytes

    # --- internals ------------------------------------------------------------------------------------

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
            self._arrays[key] = array.with_config(_ARRAY_CONFIG)
        return self._arrays[key]

    def _files_intact(self, checkpoint: int, shard: int, size_of: Callable[[str], int | None]) -> bool:
        """Every chunk file (or object) of the shard exists with the exact size of its uncompressed
        chunk; `size_of` gives the size of a key in the store, None if missing."""
        for name in ROW_ARRAYS + SHARD_ARRAYS:
            array = self._array(checkpoint, name)
            coords = (shard,) + (0,) * (array.ndim - 1)
            key = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
            if size_of(key) != math.prod(array.chunks) * array.dtype.itemsize:
                return False
        return True

    def _digest_matches(self, checkpoint: int, shard: int) -> bool:
        try:
            self._verified(checkpoint, self.shard_rows(shard))
        except UnreachableStoreError:
            raise
        except Exception:  # a damaged or unreadable chunk is simply not done
            return False
        return True


def mark_deleted(path: str | Path | Location) -> None:
    """Mark the store at `path` as being deleted (see `delete_store`)."""
    location = locate(path)
    if location.exists():
        location.write(DELETED_MARK, b"")


def delete_store(path: str | Path | Location) -> None:
    """Delete the store at `path`, safe against workers writing it: mark it, then remove it so that no
    listing sees half a store (a folder is moved aside in one rename, so `path` is free at once; in a
    bucket `zarr.json` goes first, then the other objects; `Location.remove`).

    A worker that passed its last check before the mark may still write one shard under `path`; that
    leaves a folder (or prefix) without `zarr.json`, which `is_leftover` recognises and the next create
    clears.
    """
    locate(path).remove(DELETED_MARK)


def remove_set_aside(root: Path | Location) -> None:
    """Finish every deletion under the folder `root` that was killed after its rename: the folders set
    aside are no store's any more (their names are free), only their files are left to remove. A
    bucket sets nothing aside (`BucketLocation.remove`)."""
    if isinstance(root, BucketLocation):
        return
    folder = root.folder if isinstance(root, LocalLocation) else root
    for aside in folder.glob(f"{ASIDE_PREFIX}*") if folder.is_dir() else ():
        shutil.rmtree(aside, ignore_errors=True)


def is_leftover(path: str | Path | Location) -> bool:
    """Something without `zarr.json`, or marked deleted: what a deletion leaves, never a store."""
    location = locate(path)
    return location.exists() and (not location.has("zarr.json") or location.has(DELETED_MARK))


def list_stores(root: str | Path | Location) -> list[str]:
    """Names of the stores directly under `root` (a folder or a bucket prefix), sorted; hidden names
    and what a deletion left are not stores."""
    return [
        child.name
        for child in locate(root).children()
        if not child.name.startswith(".") and child.has("zarr.json") and not child.has(DELETED_MARK)
    ]


def _resolve(
    spec: IndexSpec, root: Path | None, path: Path | Location, *, data_root: Path | None, stale: bool = False
) -> tuple[IndexPlan, InputMirrors]:
    """The spec's plan, its inputs at URLs read from their local mirrors (`storage.inputs`), and the
    mirrors; when reopening a store, a failure to resolve means its inputs changed."""
    mirrors: InputMirrors | None = None
    try:
        mirrors = current_inputs().localize(spec)
        with mirrors.released_on_error():
            if is_url(spec.dataset.source):  # its files must stay inside its mirror
                local = Path(mirrors.spec.dataset.source)
                data_root = local if local.is_dir() else local.parent
            plan = IndexPlan.resolve(mirrors.spec, root, data_root=data_root)
    except UnreachableStoreError:  # the inputs' bucket is out of reach: no input changed
        raise
    except RetracError as error:
        message = mirrors.named(str(error)) if mirrors is not None else str(error)
        if not stale:
            if message == str(error):
                raise
            raise type(error)(message) from error
        raise StaleStoreError(
            f"{path.name} is stale: its inputs no longer resolve: {message}; put them back where they were "
            f"(its paths are recorded absolute), or {REBUILD}"
        ) from error
    return dataclasses.replace(plan, spec=spec), mirrors


def _write_latents(group: zarr.Group, latents: torch.Tensor, shard_size: int) -> int:
    """Write a latent model's training latents (chunks of one shard's rows); returns their digest."""
    values = latents.detach().cpu().to(torch.float32).numpy()
    array = group.create_array(
        "latents", shape=values.shape, chunks=(shard_size, *values.shape[1:]), dtype="float32",
        fill_value=0, compressors=None, chunk_key_encoding=_CHUNK_KEYS, config=_ARRAY_CONFIG,
    )
    array[:] = values
    return _digest([values])


def _describe(plan: IndexPlan, mirrors: InputMirrors) -> dict[str, Any]:
    """The root attributes of a new store for `plan`; inputs read from mirrors are recorded by URL."""
    spec = plan.spec
    dim = num_parameters(plan.load_model(0)) if spec.projector.kind == "identity" else spec.projector.dim
    shard_size = _even_shard_size(plan.num_rows, spec.shard_size)
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


def _even_shard_size(rows: int, most: int) -> int:
    """Rows per shard: as many shards as `most` rows each need, with the rows spread evenly over them,
    so that the last shard is short by fewer rows than there are shards."""
    return math.ceil(rows / math.ceil(rows / most))


def _digest(arrays: Sequence[np.ndarray] | Any) -> int:
    """xxh3_64 of the arrays' bytes in turn: a check against damage, not against an attacker."""
    hasher = xxhash.xxh3_64()
    for array in arrays:
        hasher.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return hasher.intdigest()


def _values(array: zarr.Array | zarr.Group, selection: slice = slice(None)) -> np.ndarray:
    """`array[selection]`, which zarr types as any scalar or array: a slice of an array reads an ndarray."""
    return cast(np.ndarray, cast(zarr.Array, array)[selection])


def _read_or_zero(array: zarr.Array, index: int) -> float:
    try:
        return float(cast(float, array[index]))
    except UnreachableStoreError:
        raise
    except Exception:  # a missing or truncated mark reads as not done
        return 0.0


def _stat(file: Path) -> tuple[int, int, int] | None:
    try:
        info = file.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size
