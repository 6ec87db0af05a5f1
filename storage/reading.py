"""Reading a store's rows: resident loads, scan chunks, rows by index, and the per-row arrays.

`ReadableStore` keeps a checkpoint's projected rows and norms in memory after a first full read when
they fit `resident_bytes`, and streams whole shards otherwise; every read of projected rows and norms
checks each shard against its digest (`ShardedStore._verified`) and refuses damage with a
DamagedStoreError. `chunks` gives `(first row, one RowChunk per checkpoint)` as `retrac.scoring.scan`
takes them, and an IncompleteStoreError if an asked checkpoint has shards not done. Projected rows are
tensors of the spec's dtype (bfloat16 viewed from its stored bits).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np
import torch
import zarr

from retrac.scoring import SCAN_ROWS, RowChunk
from storage.errors import IncompleteStoreError
from storage.layout import read_values
from storage.location import Location
from storage.shards import ShardedStore

__all__ = ["DEFAULT_RESIDENT_BYTES", "RESIDENT_STEP", "ReadableStore"]

DEFAULT_RESIDENT_BYTES = 2 << 30
"""Bytes of projected gradients and norms an opened store keeps in memory after a first full read
(float16 rows as float32 when all of them fit so, `ReadableStore._widens`). Reading Zarr back is much
slower than scanning memory (docs/performance.md, bench/store.py), so a serving process keeps an index
resident when it fits, and streams only what does not."""

RESIDENT_STEP = 16384
"""Rows per scan step when every scanned checkpoint is resident: no copy is made, and larger steps
spend less on per-step work (allocations, top-k merges)."""


class ReadableStore(ShardedStore):
    """A store's shards with the reads that score: resident or streamed, always verified."""

    def __init__(self, location: Location, group: zarr.Group, *, resident_bytes: int) -> None:
        super().__init__(location, group)
        self.resident_bytes = resident_bytes
        self._resident: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._resident_lock = threading.Lock()  # one load per checkpoint, also under concurrent queries

    def timesteps(self, checkpoint: int) -> np.ndarray:
        """Stored slot timesteps `(N, S)` int64 of one checkpoint (zeros where not done)."""
        return read_values(self._array(checkpoint, "timesteps"))

    def timesteps_of(self, checkpoint: int, rows: np.ndarray) -> np.ndarray:
        """Stored slot timesteps `(len(rows), S)` int64 of the given rows only (sorted, unique)."""
        if rows.size == 0:
            return np.zeros((0, self.num_slots), dtype=np.int64)
        return cast(
            np.ndarray, self._array(checkpoint, "timesteps").get_orthogonal_selection((rows, slice(None)))
        )

    def seeds(self, checkpoint: int) -> np.ndarray:
        """Stored slot noise seeds `(N, S)` int64 of one checkpoint (zeros where not done)."""
        return read_values(self._array(checkpoint, "seeds"))

    def norms(self, checkpoint: int) -> np.ndarray:
        """Stored exact gradient norms `(N, S)` float32 of one checkpoint (zeros where not done)."""
        return read_values(self._array(checkpoint, "norms"))

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
        multiplies them uncopied, faster for one query than converting them block by block
        (bench/scale.py), at twice the memory, so only when all checkpoints fit the budget so."""
        if self.spec.dtype != "float16":
            return False
        per_checkpoint = self.num_rows * self.num_slots * (self.dim * 4 + 4)
        return per_checkpoint * self.num_checkpoints <= self.resident_bytes
