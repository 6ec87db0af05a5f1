"""Celery tasks. `index_shard` computes and stores one (checkpoint, shard) of a store.

A task takes ids (store path, checkpoint, shard), rereads the store, and calls the one idempotent
engine step `storage.run_shard`: a shard already done is skipped, a redelivered one rewrites the same
bytes. A task that completes a checkpoint, or finds it complete with its kernel missing or stale,
builds the kernel if the spec asks for one (`storage.kernels`), and the one that completes a store its
ANN index (`storage.build_ann_when_complete`).
After each gradient batch the shard's rows are recorded in the store (`storage.progress`) and sent
as a `task-rows` event; its log lines carry the job, its index and the request that started it.
Each worker process keeps its opened stores and loaded models between tasks.
"""

from __future__ import annotations

import os
import socket
import time
from functools import partial
from typing import Any

import torch
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger

from retrac.computers import GradientComputerCache
from storage import DeletedStoreError, OpenStores, build_ann_when_complete, is_leftover, run_shard
from storage.kernels import build_kernel_when_complete
from storage.location import STORE_SUFFIX, TRANSIENT_STORE_ERRORS, locate
from storage.runner import RowsCallback
from worker import logs
from worker.app import app
from worker.cancellation import is_cancelled
from worker.metrics import ROWS_EVENT
from worker.settings import get_settings

logger = get_task_logger(__name__)

TRANSIENT_ERRORS = (OSError, torch.OutOfMemoryError, *TRANSIENT_STORE_ERRORS)
"""Errors worth retrying with backoff: file systems, object stores and devices that may recover.
Retrac's named errors (stale store, bad spec) are not: retrying would fail the same way."""

_stores: OpenStores | None = None
_models: GradientComputerCache | None = None


@worker_process_init.connect
def _limit_threads(**_: Any) -> None:
    torch.set_num_threads(get_settings().torch_threads)


class ShardTask(app.Task):
    """Reads its retry limit from the settings when a retry is decided, not when the module loads."""

    @property
    def max_retries(self) -> int:
        return get_settings().max_retries


@app.task(
    bind=True,
    base=ShardTask,
    name="retrac.index_shard",
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=True,
    retry_backoff_max=120,
    retry_jitter=True,
)
def index_shard(
    self: Any, store_path: str, checkpoint: int, shard: int, request_id: str | None = None
) -> dict[str, Any]:
    """Compute and store shard `shard` of checkpoint `checkpoint` of the store at `store_path`;
    `request_id` is the HTTP request that started the job, carried into this task's log lines."""
    job = self.request.group
    index = store_path.rstrip("/").rsplit("/", 1)[-1].removesuffix(STORE_SUFFIX)  # as the service names it
    with logs.bind(request_id=request_id, job=job, index=index, task=self.request.id):
        if job and is_cancelled(job):
            logger.info("job %s cancelled: shard %d/%d skipped", job, checkpoint, shard)
            return _outcome("cancelled", checkpoint, shard, 0.0)
        rows_event = partial(self.send_event, ROWS_EVENT)
        return _index_shard(store_path, checkpoint, shard, lambda rows: rows_event(rows=rows))


def _index_shard(store_path: str, checkpoint: int, shard: int, on_rows: RowsCallback) -> dict[str, Any]:
    path = locate(store_path, get_settings().bucket_options())  # a folder or an s3:// URL
    if is_leftover(path) or not path.has("zarr.json"):
        logger.warning("store %s is gone or being deleted: shard %d/%d skipped", path, checkpoint, shard)
        return _outcome("missing", checkpoint, shard, 0.0)
    started = time.perf_counter()
    try:
        store = _open_stores().get(path)
        logger.info("checkpoint %d shard %d: computing %d rows", checkpoint, shard, store.shard_length(shard))
        computed = run_shard(store, checkpoint, shard, _model_cache(), on_rows=on_rows)
        # the task completing a checkpoint, or one finding it complete with its kernel missing or stale
        # (a build cut short, rows rewritten since): both build it
        if store.done_shards(checkpoint).all() and build_kernel_when_complete(store, checkpoint):
            logger.info("store %s checkpoint %d complete: kernel built", path, checkpoint)
        if computed and build_ann_when_complete(store):  # the job's last step, after its last shard
            logger.info("store %s complete: ANN index built", path)
    except DeletedStoreError as error:  # deleted while this shard was computed: nothing was written
        logger.warning("%s: shard %d/%d dropped", error, checkpoint, shard)
        return _outcome("missing", checkpoint, shard, 0.0)
    seconds = time.perf_counter() - started
    if computed:
        rows = store.shard_length(shard)
        logger.info("checkpoint %d shard %d: %d rows stored in %.1f s (%.2f rows/s)", checkpoint, shard, rows,
                    seconds, rows / seconds)
    return _outcome("computed" if computed else "skipped", checkpoint, shard, seconds)


def _outcome(status: str, checkpoint: int, shard: int, seconds: float) -> dict[str, Any]:
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return {"status": status, "checkpoint": checkpoint, "shard": shard, "seconds": seconds, "worker": worker}


def _open_stores() -> OpenStores:
    global _stores
    if _stores is None:
        get_settings().use_input_cache()
        _stores = OpenStores(get_settings().bucket_options())
    return _stores


def _model_cache() -> GradientComputerCache:
    global _models
    if _models is None:
        settings = get_settings()
        _models = settings.gradient_computers(settings.model_cache_size)
    return _models
