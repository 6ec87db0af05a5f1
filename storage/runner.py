"""Filling a store: `run_shard` computes and stores one (checkpoint, shard); `run_pending` runs them all.

`run_shard` is the one task body: the Celery task calls it, and the embedded runner calls it in a
loop, so a store built either way holds the same bytes. It is idempotent: a done shard is skipped,
and a recomputed one gets identical bytes (fixed thread count, same row slice, same batching).
"""

from __future__ import annotations

from collections.abc import Callable

from retrac.computers import GradientComputerCache
from storage.ann import AnnProgress, build_ann_when_complete
from storage.kernels import build_kernel_when_complete
from storage.progress import ShardProgress
from storage.store import GradientStore

ShardCallback = Callable[[int, int, int], None]
"""Called after each shard with (checkpoint, shard, rows in it)."""

RowsCallback = Callable[[int], object]
"""Called after each gradient batch with the rows it completed: a progress bar that moves per batch."""


def run_shard(
    store: GradientStore,
    checkpoint: int,
    shard: int,
    models: GradientComputerCache,
    *,
    force: bool = False,
    on_rows: RowsCallback | None = None,
) -> bool:
    """Compute, write and mark done one shard, unless it is done already (or `force`).

    Returns whether it computed. Rows are computed on `models`' device with its fixed thread count;
    after each batch the shard's progress is recorded in the store (`storage.progress.ShardProgress`)
    and `on_rows(rows)` is called.
    """
    if not force and store.is_done(checkpoint, shard):
        return False
    computer = models.computer(store.plan, checkpoint)
    report = ShardProgress(store, checkpoint, shard)

    def batch_done(rows: int) -> None:
        report(rows)
        if on_rows is not None:
            on_rows(rows)

    try:
        with models.compute():
            rows = store.plan.compute_rows(checkpoint, store.shard_rows(shard), computer, batch_done)
        store.write_shard(checkpoint, shard, rows)
    finally:
        report.finish()
    return True


def run_pending(
    store: GradientStore,
    models: GradientComputerCache | None = None,
    *,
    on_shard: ShardCallback | None = None,
    on_rows: RowsCallback | None = None,
    on_ann: AnnProgress | None = None,
) -> int:
    """The embedded runner: every pending shard, in this process, without a queue, then each complete
    checkpoint's kernel if the spec asks for one and none is current (`storage.kernels`), then the ANN
    index (`storage.ann`, its progress told to `on_ann`) when the store is complete and has none. Returns
    how many shards ran."""
    models = models or GradientComputerCache()
    count = 0
    for checkpoint, shard in store.pending():
        count += run_shard(store, checkpoint, shard, models, on_rows=on_rows)
        if on_shard is not None:
            on_shard(checkpoint, shard, store.shard_length(shard))
    for checkpoint in range(store.num_checkpoints):
        build_kernel_when_complete(store, checkpoint)
    build_ann_when_complete(store, on_ann)
    return count
