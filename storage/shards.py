"""Writing a store's shards and checking them: digests, done marks, intact chunk files, status.

A task writes a shard's data, then its digest, then its done mark (docs/store-format.md, "Shards and
done marks"). A shard is done when its mark is set and every chunk file has the exact size of an
uncompressed chunk; `verify` also rereads its bytes against the digest. `ShardedStore._verified`
is the one read of per-row data: it refuses a shard not done with an IncompleteStoreError, and one
whose bytes differ from its digest (or are unreadable) with a DamagedStoreError naming the shard and
how to rebuild it. A shard's digest binds its bytes to its place (`ShardedStore.shard_digest`), so
rows moved to another checkpoint or shard are refused as damage too; the sample ids have a digest of
their own. `digest` is xxh3_64 of arrays' bytes: a check against damage, not against an attacker.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import xxhash
import zarr

from retrac.plan import Rows
from storage.errors import (
    DamagedStoreError,
    DeletedStoreError,
    IncompleteStoreError,
    StoreError,
    UnreachableStoreError,
)
from storage.freshness import REBUILD
from storage.layout import (
    ARRAY_CONFIG,
    CHUNK_KEYS,
    DELETED_MARK,
    ROW_ARRAYS,
    SHARD_ARRAYS,
    StoreLayout,
    read_values,
)

__all__ = [
    "CheckpointStatus", "ShardArrays", "ShardedStore", "StoreStatus", "digest", "ids_digest", "write_latents",
]

REBUILD_SHARDS = "rebuild it with `retrac index status --verify STORE` then `retrac index run STORE`"


class ShardArrays(NamedTuple):
    """The per-row arrays (`ROW_ARRAYS`, in order) of some rows of one checkpoint, as stored."""

    projected: np.ndarray
    norms: np.ndarray
    timesteps: np.ndarray
    seeds: np.ndarray

    def at(self, rows: np.ndarray | slice) -> ShardArrays:
        """The same arrays at `rows` only."""
        return ShardArrays(*(array[rows] for array in self))

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self)

    @classmethod
    def joined(cls, parts: Sequence[ShardArrays]) -> ShardArrays:
        """The parts' rows one after another."""
        return cls(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))


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


class ShardedStore(StoreLayout):
    """A store's layout with its shards' writing, done marks and verification."""

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
            # finite in float32: beyond the stored dtype's range
            overflow = bool(torch.isfinite(rows.projected).all())
            advice = f" beyond {self.spec.dtype}'s range; index with dtype float32 or bfloat16"
            advice = advice if overflow else ""
            raise StoreError(f"checkpoint {checkpoint} shard {shard}: non-finite projected gradients{advice}")
        self.require_live()
        done = self._array(checkpoint, "done_at")
        done[shard] = 0.0  # a rewrite is pending until its new mark
        for name, values in data.items():
            self._array(checkpoint, name)[part] = values
        self._array(checkpoint, "digest")[shard] = self.shard_digest(checkpoint, shard, data.values())
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

    @property
    def sample_ids(self) -> tuple[str, ...]:
        """The rows' sample ids, checked against their digest (a DamagedStoreError if they differ)."""
        if self._sample_ids is None:
            ids = tuple(str(i) for i in read_values(self._group["sample_ids"]))
            if ids_digest(ids) != self.attrs.get("sample_ids_digest"):
                raise DamagedStoreError(
                    f"{self.path.name}: its sample ids do not match their digest (damaged); {REBUILD}"
                )
            self._sample_ids = ids
        return self._sample_ids

    def shard_digest(self, checkpoint: int, shard: int, arrays: Iterable[np.ndarray]) -> int:
        """The digest of one shard's per-row arrays, bound to its place: the checkpoint's position, the
        fingerprint of its weights and the shard's position are hashed first, so that rows swapped
        between checkpoints or shards (each with its own digest) do not match where they now lie."""
        weights = self.attrs["fingerprints"]["weights"][checkpoint]
        place = np.frombuffer(json.dumps([checkpoint, weights, shard]).encode(), dtype=np.uint8)
        return digest([place, *arrays])

    def done_marks(self, checkpoint: int, shards: slice = slice(None)) -> np.ndarray:
        """Done-mark times of one checkpoint's `shards` (all by default), 0 where not done or unreadable."""
        array = self._array(checkpoint, "done_at")
        try:
            return np.asarray(array[shards], dtype=np.float64)
        except UnreachableStoreError:  # an outage is no damage: never read as "not done"
            raise
        except Exception:  # one damaged mark must not hide the others
            chosen = range(self.num_shards)[shards]
            return np.array([_read_or_zero(array, i) for i in chosen], dtype=np.float64)

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

    def shard_digests(self, checkpoint: int) -> np.ndarray:
        """The digests `(shards,)` uint64 of one checkpoint's shards, as their done marks hold them."""
        return np.asarray(self._array(checkpoint, "digest")[:], dtype=np.uint64)

    def _verified(self, checkpoint: int, part: slice) -> ShardArrays:
        """The per-row arrays of whole shards `part`, each shard checked against its digest.

        An IncompleteStoreError naming the first shard not done; a DamagedStoreError naming the first
        shard whose bytes differ from its digest or cannot be read, and how to rebuild it.
        """
        first = part.start // self.shard_size
        shards = range(first, first + math.ceil((part.stop - part.start) / self.shard_size))
        marks = self.done_marks(checkpoint, slice(shards.start, shards.stop))
        if not (marks > 0).all():
            shard = shards[int(np.flatnonzero(marks <= 0)[0])]
            raise IncompleteStoreError(
                f"{self.path.name}: checkpoint {checkpoint} shard {shard} is not done; finish indexing "
                "with `retrac index run`"
            )
        arrays = self._read(checkpoint, part, shards)
        digests = read_values(self._array(checkpoint, "digest"), slice(shards.start, shards.stop))
        for shard, expected in zip(shards, digests, strict=True):
            rows = self.shard_rows(shard)
            local = slice(rows.start - part.start, rows.stop - part.start)
            if self.shard_digest(checkpoint, shard, arrays.at(local)) != int(expected):
                raise self._damaged(checkpoint, shard, "does not match its done mark's digest")
        return arrays

    def _read(self, checkpoint: int, part: slice, shards: range) -> ShardArrays:
        """The per-row arrays of rows `part` (whole `shards`); a DamagedStoreError naming the first
        shard with an unreadable chunk file."""
        try:
            return ShardArrays(*(read_values(self._array(checkpoint, name), part) for name in ROW_ARRAYS))
        except UnreachableStoreError:
            raise
        except Exception as error:  # zarr raises several kinds on a truncated or mangled chunk
            if len(shards) == 1:
                raise self._damaged(checkpoint, shards[0], f"cannot be read ({error})") from error
            for shard in shards:  # name the first shard that fails alone
                self._read(checkpoint, self.shard_rows(shard), range(shard, shard + 1))
            raise

    def _damaged(self, checkpoint: int, shard: int, what: str) -> DamagedStoreError:
        rows = self.shard_rows(shard)
        return DamagedStoreError(
            f"index {self.path.name!r}: checkpoint {checkpoint} shard {shard} (rows {rows.start}.."
            f"{rows.stop - 1}) {what}; {REBUILD_SHARDS}"
        )

    def _stored_latents(self) -> torch.Tensor:
        """The latents written at create, checked against their digest: every worker computes from
        these same bytes, so a shard is the same whichever machine (and VAE kernel) computes it."""
        try:
            latents = np.asarray(read_values(self._group["latents"]), dtype=np.float32)
        except KeyError as error:
            raise StoreError(
                f"{self.path.name}: a latent model's store without its latents; {REBUILD}"
            ) from error
        if digest([latents]) != int(self.attrs.get("latents_digest", -1)):
            raise DamagedStoreError(
                f"{self.path.name}: its stored latents do not match their digest (damaged); {REBUILD}"
            )
        return torch.from_numpy(latents)

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


def write_latents(group: zarr.Group, latents: torch.Tensor, shard_size: int) -> int:
    """Write a latent model's training latents (chunks of one shard's rows); returns their digest."""
    values = latents.detach().cpu().to(torch.float32).numpy()
    array = group.create_array(
        "latents", shape=values.shape, chunks=(shard_size, *values.shape[1:]), dtype="float32",
        fill_value=0, compressors=None, chunk_key_encoding=CHUNK_KEYS, config=ARRAY_CONFIG,
    )
    array[:] = values
    return digest([values])


def ids_digest(ids: Sequence[str]) -> int:
    """xxh3_64 of the sample ids, as JSON: recorded at create, checked whenever they are read."""
    return xxhash.xxh3_64_intdigest(json.dumps(list(ids)).encode())


def digest(arrays: Sequence[np.ndarray] | Any) -> int:
    """xxh3_64 of the arrays' bytes in turn: a check against damage, not against an attacker."""
    hasher = xxhash.xxh3_64()
    for array in arrays:
        hasher.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return hasher.intdigest()


def _read_or_zero(array: zarr.Array, index: int) -> float:
    try:
        return float(cast(float, array[index]))
    except UnreachableStoreError:
        raise
    except Exception:  # a missing or truncated mark reads as not done
        return 0.0
