"""Indexing jobs: submit the pending shards of a store as a Celery group, follow it, cancel it.

A job is a group of `index_shard` tasks, one per (checkpoint, shard) not done when it was submitted;
its id is the group's id. Progress comes from the store's done marks (`storage.progress`), so it is
right whoever fills the store, and a job lost with the broker is resumed by submitting again: only
what is still pending is queued.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from celery import group
from celery.result import GroupResult

from retrac.exceptions import RetracError
from storage import GradientStore, Location, NothingToIndexError, Progress, locate
from storage import progress as store_progress
from storage.kernels import kernel_pending
from worker.app import app
from worker.cancellation import is_cancelled, mark_cancelled
from worker.settings import get_settings
from worker.tasks import index_shard

JobState = Literal["queued", "running", "done", "failed", "cancelled"]

PING_SECONDS = 1.0
"""How long `stalled` waits for any worker to answer a ping."""

_SUBMITTED = "retrac-submitted-"
"""Result-backend key prefix of a job's submission time."""


class JobNotFoundError(RetracError):
    """The result backend does not know the job (wrong id, expired, or lost with the broker)."""


def submit(
    store_path: str | Path | Location,
    *,
    root: Path | None = None,
    queue: str | None = None,
    request_id: str | None = None,
) -> str:
    """Queue every pending shard of the store at `store_path` (on `queue`, default the settings');
    return the job id. A store whose shards are all done but whose spec's kernel is missing or stale at
    some checkpoint gets one task per such checkpoint (its last shard, found done), which builds it.
    `request_id` (the HTTP request that asked for the job) goes with every task, so the workers' log
    lines for the job carry it; Flower shows each task as index, checkpoint, shard.

    The store is opened and checked first, so a stale store is refused before anything is queued,
    and a complete one with current kernels raises `NothingToIndexError` (Celery cannot save an empty
    group).
    """
    path = _locate(store_path)
    store = GradientStore.open(path, root=root)
    pending = store.pending() or [
        (c, store.num_shards - 1) for c in range(store.num_checkpoints) if kernel_pending(store, c)
    ]
    if not pending:
        raise NothingToIndexError(f"{path.name}: every shard is done; nothing is left to index")
    job = group(
        index_shard.signature(
            (str(path), c, s),
            {"request_id": request_id},
            argsrepr=f"(index={path.name!r}, checkpoint={c}, shard={s})",
        )
        for c, s in pending
    ).apply_async(queue=queue)
    job.save()
    record = {"at": time.time(), "queue": queue or get_settings().queue, "request_id": request_id}
    app.backend.set(_SUBMITTED + str(job.id), json.dumps(record))
    return str(job.id)


def progress(store_path: str | Path | Location) -> Progress:
    """Done/total rows, recent rate and time left of the store at `store_path`, from its done marks."""
    return store_progress(GradientStore.open(_locate(store_path), check=False))


def state(job_id: str) -> JobState:
    """Where a job is: queued, running, done, failed or cancelled."""
    if is_cancelled(job_id):
        return "cancelled"
    states = [task.state for task in _restore(job_id).results]
    if "FAILURE" in states:
        return "failed"
    if all(s == "SUCCESS" for s in states):
        return "done"
    if any(s in ("STARTED", "RETRY", "SUCCESS") for s in states):
        return "running"
    return "queued"


def failure(job_id: str) -> str | None:
    """Why a failed job failed: the error of its first failed shard (None if none failed)."""
    for task in _restore(job_id).results:
        if task.state == "FAILURE":
            where = f"checkpoint {task.args[1]} shard {task.args[2]}: " if task.args else ""
            return f"{where}{type(task.result).__name__}: {task.result}"
    return None


def stalled(job_id: str, store_path: str | Path | Location, *, seconds: float) -> str | None:
    """Why an unfinished job looks stalled: no shard finished or reported a batch and no worker answered
    a ping on its queue for `seconds` since the later of its submission and its last sign; else None."""
    done = progress(store_path)
    stored = app.backend.get(_SUBMITTED + job_id)
    submitted: dict[str, Any] = json.loads(stored) if stored else {"at": 0.0, "queue": get_settings().queue}
    idle = time.time() - max(done.last_active_at or 0.0, submitted["at"])
    if done.complete or idle < seconds or _consumers(submitted["queue"]):
        return None
    return (
        f"no shard finished and no worker answered for {idle:.0f} s; start workers with `retrac worker` "
        "on a machine that sees the store"
    )


def _locate(store_path: str | Path | Location) -> Location:
    """The store's folder (absolute, as workers must see it) or bucket URL, reached by the settings."""
    return locate(store_path, get_settings().bucket_options())


def _consumers(queue: str) -> list[str]:
    """Workers that answer within `PING_SECONDS` and consume `queue`."""
    answers = app.control.inspect(timeout=PING_SECONDS).active_queues() or {}
    return [host for host, queues in answers.items() if any(q.get("name") == queue for q in queues)]


def cancel(job_id: str) -> None:
    """Cancel a job: its queued tasks are dropped (running shards finish; they are stored whole or not)."""
    job = _restore(job_id)
    mark_cancelled(job_id)
    job.revoke()


def _restore(job_id: str) -> GroupResult:
    job = GroupResult.restore(job_id, app=app)
    if job is None:
        raise JobNotFoundError(
            f"no job {job_id!r} in the result backend (expired, or lost with the broker); "
            "submit the store again to resume it"
        )
    return job
