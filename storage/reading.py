"""Reading a store's rows: resident loads, scan chunks, rows by index, and the per-row arrays.

`ReadableStore` keeps a checkpoint's per-row arrays in memory after a first full read when they fit
`resident_bytes`, and streams whole shards otherwise. Every read comes from a verified copy: a
resident one, read through `ShardedStore._verified` with a stamp of the checkpoint's files, and read
again (and so checked again) once its files change; or whole shards from disk, each checked against
its digest. Damage is refused with a DamagedStoreError, rows not done with an IncompleteStoreError.
`chunks` gives `(first row, one RowChunk per checkpoint)` as `retrac.scoring.scan` takes them.
Projected rows are tensors of the spec's dtype (bfloat16 viewed from its stored bits).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import zarr

from retrac.scoring import SCAN_ROWS, RowChunk
from storage.errors import IncompleteStoreError
from storage.layout import ROW_ARRAYS
from storage.location import Location
from storage.shards import ShardArrays, ShardedStore

__all__ = ["DEFAULT_RESIDENT_BYTES", "RESIDENT_STEP", "ReadableStore"]

DEFAULT_RESIDENT_BYTES = 2 << 30
"""Bytes of per-row arrays an opened store keeps in memory after a first full read (float16 rows as
float32 when all of them fit so, `ReadableStore._widens`). Reading Zarr back is much slower than
scanning memory (docs/performance.md, bench/store.py), so a serving process keeps an index resident
when it fits, and streams only what does not."""

RESIDENT_STEP = 16384
"""Rows per scan step when every scanned checkpoint is resident: no copy is made, and larger steps
spend less on per-step work (allocations, top-k merges)."""


class ReadableStore(ShardedStore):
    """A store's shards with the reads that score: resident or streamed, always verified."""

    def __init__(self, location: Location, group: zarr.Group, *, resident_bytes: int) -> None:
        super().__init__(location, group)
        self.resident_bytes = resident_bytes
        self._resident: dict[int, tuple[Any, ShardArrays]] = {}  # checkpoint: (its files' stamp, arrays)
        self._resident_lock = threading.Lock()  # one load per checkpoint, also under concurrent queries

    def timesteps(self, checkpoint: int) -> np.ndarray:
        """Stored slot timesteps `(N, S)` int64 of one complete checkpoint."""
        return self._whole(checkpoint, "timesteps")

    def timesteps_of(self, checkpoint: int, rows: np.ndarray) -> np.ndarray:
        """Stored slot timesteps `(len(rows), S)` int64 of the given rows only (sorted, unique)."""
        return self.stored_rows(checkpoint, rows).timesteps

    def seeds(self, checkpoint: int) -> np.ndarray:
        """Stored slot noise seeds `(N, S)` int64 of one complete checkpoint."""
        return self._whole(checkpoint, "seeds")

    def norms(self, checkpoint: int) -> np.ndarray:
        """Stored exact gradient norms `(N, S)` float32 of one complete checkpoint."""
        return self._whole(checkpoint, "norms")

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
        resident = {c: self._load_resident(c) for c in chosen}  # read again if their files changed
        if all(r is not None for r in resident.values()):  # views of memory: fewer, larger steps
            rows_per_chunk = max(rows_per_chunk, RESIDENT_STEP)
        for part in self._parts(rows_per_chunk):
            yield part.start, [self._chunk(c, part, resident[c]) for c in chosen]

    def rows_at(self, checkpoint: int, rows: np.ndarray) -> RowChunk:
        """Projected rows and norms of the given `rows` (sorted, unique) of one checkpoint, as a scan
        reads them (`stored_rows`)."""
        stored = self.stored_rows(checkpoint, rows)
        return RowChunk(self._projected(stored.projected), torch.from_numpy(stored.norms))

    def stored_rows(self, checkpoint: int, rows: np.ndarray) -> ShardArrays:
        """Every per-row array at the given `rows` (sorted, unique) of one checkpoint: from resident
        memory, or by whole shards, each checked against its digest."""
        resident = self._load_resident(self._checkpoint(checkpoint))
        if resident is not None:
            return resident.at(rows)
        shards = rows // self.shard_size
        parts = [
            self._verified(checkpoint, self.shard_rows(int(shard))).at(
                rows[shards == shard] - self.shard_rows(int(shard)).start
            )
            for shard in np.unique(shards)
        ]
        if not parts:  # no rows: empty arrays of the stored shapes and dtypes
            stored = [self._array(checkpoint, name) for name in ROW_ARRAYS]
            return ShardArrays(*(np.zeros((0, *a.shape[1:]), dtype=a.dtype) for a in stored))
        return ShardArrays.joined(parts)

    def data_stamp(self, checkpoint: int | None = None) -> Any:
        """A stamp of the files of one checkpoint (of every checkpoint by default): one listing, and
        different once any of them is rewritten, replaced or moved. What a copy of rows or of results
        computed from them is kept with, to be computed again when it no longer matches."""
        if checkpoint is None:
            return tuple(self.data_stamp(c) for c in range(self.num_checkpoints))
        return self.location.stamps(f"checkpoints/{self._checkpoint(checkpoint)}")

    def _whole(self, checkpoint: int, name: str) -> np.ndarray:
        """One per-row array of every row of a checkpoint: resident, or read shards at a time (at most
        `SCAN_ROWS` rows of every array in memory beyond the result), each checked against its digest."""
        resident = self._load_resident(self._checkpoint(checkpoint))
        if resident is not None:
            return getattr(resident, name)
        return np.concatenate([getattr(self._verified(checkpoint, p), name) for p in self._parts(SCAN_ROWS)])

    def _parts(self, rows_per_part: int) -> Iterator[slice]:
        """All rows in runs of whole shards, `rows_per_part` or more each (the last may be short)."""
        step = max(1, math.ceil(rows_per_part / self.shard_size)) * self.shard_size
        for start in range(0, self.num_rows, step):
            yield slice(start, min(start + step, self.num_rows))

    def _chunk(self, checkpoint: int, part: slice, resident: ShardArrays | None) -> RowChunk:
        stored = resident.at(part) if resident is not None else self._verified(checkpoint, part)
        return RowChunk(self._projected(stored.projected), torch.from_numpy(stored.norms))

    def _projected(self, stored: np.ndarray) -> torch.Tensor:
        """Stored projected rows as a tensor of the spec's dtype, sharing their memory (bfloat16 is
        stored as its bits, `ZARR_DTYPES`)."""
        tensor = torch.from_numpy(stored)
        return tensor.view(torch.bfloat16) if self.spec.dtype == "bfloat16" else tensor

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the checkpoints held in memory for scans (at most `resident_bytes`)."""
        with self._resident_lock:
            return sum(arrays.nbytes for _, arrays in self._resident.values())

    def _load_resident(self, checkpoint: int) -> ShardArrays | None:
        """The checkpoint's arrays in memory, read once (and verified), if they fit what is left of the
        budget; float16 rows widened to float32 if every checkpoint's float32 copy fits (`_widens`).
        A resident copy whose files changed since it was read (one listing of the checkpoint's files)
        is dropped and read again, so that damage, a swap or a rewrite under it is seen at once."""
        with self._resident_lock:
            held = self._resident.pop(checkpoint, None)
            stamp = self.data_stamp(checkpoint) if held is not None else None
            if held is not None and held[0] == stamp:
                self._resident[checkpoint] = held
                return held[1]
            arrays = [self._array(checkpoint, name) for name in ROW_ARRAYS]
            widen = self._widens()
            needed = sum(a.nbytes for a in arrays) + (arrays[0].nbytes if widen else 0)
            used = sum(a.nbytes for _, a in self._resident.values())
            if used + needed > self.resident_bytes:
                return None
            stamp = stamp if stamp is not None else self.data_stamp(checkpoint)
            loaded = self._verified(checkpoint, slice(0, self.num_rows))  # read after the stamp
            if widen:
                loaded = loaded._replace(projected=loaded.projected.astype(np.float32))
            self._resident[checkpoint] = (stamp, loaded)
            return loaded

    def _widens(self) -> bool:
        """Whether resident float16 rows are kept as float32 (exactly the same numbers): a scan then
        multiplies them uncopied, faster for one query than converting them block by block
        (bench/scale.py), at twice the memory, so only when all checkpoints fit the budget so."""
        if self.spec.dtype != "float16":
            return False
        per_checkpoint = self.num_rows * self.num_slots * (self.dim * 4 + 4 + 8 + 8)
        return per_checkpoint * self.num_checkpoints <= self.resident_bytes
