"""Indexing progress read from a store's done marks alone: done/total rows, recent rate, time left.

Progress lives in the data, not in the broker: whoever fills the store (embedded runner, one
worker or many), the marks and their times say how far it is, also after a broker restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.store import GradientStore

RATE_WINDOW = 32
"""The rate is measured over the last this many shards done: recent enough to follow a job that was
paused or gained workers, long enough to smooth over single shards."""


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

    @property
    def fraction(self) -> float:
        return self.done_rows / self.total_rows if self.total_rows else 1.0

    @property
    def complete(self) -> bool:
        return self.done_shards == self.total_shards


def progress(store: GradientStore) -> Progress:
    """The store's progress now."""
    sizes = np.array([store.shard_length(i) for i in range(store.num_shards)])
    times, rows = [], []
    for c in range(store.num_checkpoints):
        done = store.done_shards(c)
        times.append(store.done_marks(c)[done])
        rows.append(sizes[done])
    order = np.argsort(np.concatenate(times), kind="stable")
    when, count = np.concatenate(times)[order], np.concatenate(rows)[order]
    done_rows, total_rows = int(count.sum()), store.num_rows * store.num_checkpoints
    rate = _recent_rate(when[-RATE_WINDOW:], count[-RATE_WINDOW:])
    remaining = total_rows - done_rows
    eta = 0.0 if remaining == 0 else (remaining / rate if rate else None)
    return Progress(
        done_rows=done_rows,
        total_rows=total_rows,
        done_shards=len(when),
        total_shards=store.num_shards * store.num_checkpoints,
        rate_per_s=rate,
        eta_s=eta,
        last_done_at=float(when[-1]) if len(when) else None,
    )


def _recent_rate(when: np.ndarray, rows: np.ndarray) -> float | None:
    """Rows per second between the first and last of these marks (the first shard's rows started before)."""
    if len(when) < 2 or when[-1] <= when[0]:
        return None
    return float(rows[1:].sum() / (when[-1] - when[0]))
