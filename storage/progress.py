"""Indexing progress read from the store alone: done/total rows, rows being computed, rate, time left.

Progress lives in the data, not in the broker: whoever fills the store (embedded runner, one
worker or many), the done marks and their times say how far it is, also after a broker restart.
A shard being computed reports its rows after each gradient batch (`ShardProgress`, at most every
`REPORT_EVERY_S`) in a small record under `computing/` in the store, removed once the shard is
stored, so a job shows rows and a rate from its first batch, before any shard is done. A record not
updated for `STALE_S` (its worker died) is ignored; a redelivered shard starts its record again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from storage.store import GradientStore

RATE_WINDOW = 32
"""The rate is measured over the last this many shards done: recent enough to follow a job that was
paused or gained workers, long enough to smooth over single shards."""

COMPUTING = "computing"
"""Folder (prefix) of the store holding one record per shard being computed."""
REPORT_EVERY_S = 1.0
"""A running shard rewrites its record at most this often (and after its first batch)."""
STALE_S = 900.0
"""A record not rewritten for this long belongs to a worker that died: it is ignored."""


@dataclass(frozen=True)
class Progress:
    """Rows (one row = one sample at one checkpoint) done of the total, over all checkpoints.

    `rate_per_s` is rows per second over the last `RATE_WINDOW` shards done (None until two are);
    `eta_s` is the time left at that rate (0 when complete, None when unknown); `last_done_at` is
    the unix time of the newest done mark (None before the first), which tells a stalled job.
    """

    done_rows: int
    total_rows: int
    done_shards: int
    total_shards: int
    rate_per_s: float | None
    eta_s: float | None
    last_done_at: float | None
    computing_rows: int = 0
    last_active_at: float | None = None

    @property
    def fraction(self) -> float:
        return self.done_rows / self.total_rows if self.total_rows else 1.0

    @property
    def complete(self) -> bool:
        return self.done_shards == self.total_shards


def progress(store: GradientStore) -> Progress:
    """The store's progress now."""
    sizes = np.array([store.shard_length(i) for i in range(store.num_shards)])
    times, rows, done_masks = [], [], []
    for c in range(store.num_checkpoints):
        done = store.done_shards(c)
        done_masks.append(done)
        times.append(store.done_marks(c)[done])
        rows.append(sizes[done])
    order = np.argsort(np.concatenate(times), kind="stable")
    when, count = np.concatenate(times)[order], np.concatenate(rows)[order]
    done_rows, total_rows = int(count.sum()), store.num_rows * store.num_checkpoints
    running = [r for r in _computing(store) if not done_masks[r.checkpoint][r.shard]]
    computing_rows = sum(min(r.rows, int(sizes[r.shard])) for r in running)
    rate = _recent_rate(when[-RATE_WINDOW:], count[-RATE_WINDOW:]) or _running_rate(running)
    remaining = total_rows - done_rows
    eta = 0.0 if remaining == 0 else (max(0, remaining - computing_rows) / rate if rate else None)
    return Progress(
        done_rows=done_rows,
        total_rows=total_rows,
        done_shards=len(when),
        total_shards=store.num_shards * store.num_checkpoints,
        rate_per_s=rate,
        eta_s=eta,
        last_done_at=float(when[-1]) if len(when) else None,
        computing_rows=computing_rows,
        last_active_at=max([*when[-1:].tolist(), *(r.updated_at for r in running)], default=None),
    )


@dataclass(frozen=True)
class _Running:
    """One shard's record: rows computed so far, when it started and when it last reported."""

    checkpoint: int
    shard: int
    rows: int
    started_at: float
    updated_at: float


def _record_key(checkpoint: int, shard: int) -> str:
    return f"{COMPUTING}/c{checkpoint}-s{shard}.json"


def _computing(store: GradientStore) -> list[_Running]:
    """The fresh records of shards being computed (unreadable or stale ones left out)."""
    now, found = time.time(), []
    for key in store.location.sizes(COMPUTING):
        data = store.location.read(key)
        try:
            record = _Running(**json.loads(data or b""))
        except (ValueError, TypeError):  # gone meanwhile, another version's, or damaged: no progress
            continue
        in_range = 0 <= record.checkpoint < store.num_checkpoints and 0 <= record.shard < store.num_shards
        if in_range and now - record.updated_at < STALE_S:
            found.append(record)
    return found


def _running_rate(running: list[_Running]) -> float | None:
    """Rows per second of the shards being computed, summed (None before any has reported twice)."""
    rates = [r.rows / (r.updated_at - r.started_at) for r in running if r.updated_at > r.started_at]
    return float(sum(rates)) if rates else None


class ShardProgress:
    """The rows callback of one shard being computed (`storage.runner.RowsCallback`): counts its rows
    and rewrites its record after the first batch and then at most every `REPORT_EVERY_S`; `finish`
    removes the record. Nothing is written once the store is gone (deleted meanwhile)."""

    def __init__(self, store: GradientStore, checkpoint: int, shard: int) -> None:
        self.store, self.checkpoint, self.shard = store, checkpoint, shard
        self.rows, self.started_at, self._reported_at = 0, time.time(), 0.0

    def __call__(self, rows: int) -> None:
        self.rows += rows
        now = time.time()
        if now - self._reported_at < REPORT_EVERY_S or not self.store.location.has("zarr.json"):
            return
        self._reported_at = now
        record = _Running(self.checkpoint, self.shard, self.rows, self.started_at, now)
        key = _record_key(self.checkpoint, self.shard)
        self.store.location.write(key, json.dumps(asdict(record)).encode())

    def finish(self) -> None:
        if self._reported_at:
            self.store.location.delete(_record_key(self.checkpoint, self.shard))


def _recent_rate(when: np.ndarray, rows: np.ndarray) -> float | None:
    """Rows per second between the first and last of these marks (the first shard's rows started before)."""
    if len(when) < 2 or when[-1] <= when[0]:
        return None
    return float(rows[1:].sum() / (when[-1] - when[0]))
