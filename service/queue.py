"""Indexing jobs through the Celery queue (`worker.control`), as the API shows them.

The queue's own errors (Redis down, a job the result backend forgot) become the service's named
errors: 503 and 404 with a message, never a 500. Progress comes from the store's done marks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import redis
from kombu.exceptions import OperationalError

from api_schemas.common import CheckPublic, IndexName
from api_schemas.jobs import JobPublic, JobState
from service.exceptions import Conflict, NotFound, Unavailable
from service.repository import StoreRepository
from storage import is_leftover
from worker import control, logs
from worker.settings import get_settings as queue_settings

QUEUE_ERRORS = (OperationalError, redis.RedisError, OSError)
PING_TIMEOUT_S = 1.0


def queue_check() -> CheckPublic:
    """Whether the job queue's Redis answers a ping within `PING_TIMEOUT_S`."""
    url = queue_settings().broker_url
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=PING_TIMEOUT_S, socket_timeout=PING_TIMEOUT_S
        )
        with client:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as error:
        return CheckPublic(ok=False, detail=f"job queue does not answer: {error}")
    return CheckPublic(ok=True, detail="job queue answers")


def start_job(repository: StoreRepository, name: IndexName) -> str:
    """Queue the pending shards of index `name`, tagged with the current request's id (its workers'
    log lines carry it); remember and return the job id."""
    if not repository.open(name).pending():
        raise Conflict(f"index {name!r} is complete: nothing is left to index")
    require_queue()
    with _queue_errors():
        job_id = control.submit(repository.path(name), request_id=logs.current("request_id"))
    repository.record_job(name, job_id)
    return job_id


def describe_job(repository: StoreRepository, job_id: str) -> JobPublic:
    """A job's index, state and progress."""
    name = repository.index_of(job_id)
    progress = control.progress(repository.path(name))
    state: JobState = "done"
    error = stalled = None
    if not progress.complete:
        with _queue_errors():
            state = control.state(job_id)
            error = control.failure(job_id) if state == "failed" else None
            if state in ("queued", "running"):
                limit = queue_settings().stall_seconds
                stalled = control.stalled(job_id, repository.path(name), seconds=limit)
    return JobPublic(
        id=job_id,
        index=name,
        state=state,
        done=progress.done_rows,
        computing=progress.computing_rows,
        total=progress.total_rows,
        fraction=progress.fraction,
        rate_per_s=progress.rate_per_s,
        eta_s=progress.eta_s,
        error=error,
        stalled=stalled,
    )


def cancel_job(repository: StoreRepository, job_id: str) -> JobPublic:
    """Cancel a job: queued shards are dropped; shards being computed finish and are kept."""
    repository.index_of(job_id)
    require_queue()
    with _queue_errors():
        control.cancel(job_id)
    return describe_job(repository, job_id)


def cancel_index_job(repository: StoreRepository, name: IndexName) -> None:
    """Cancel the job of index `name` if it may still run (before the index is deleted)."""
    job_id = repository.job_of(name)
    path = repository.path(name)
    if job_id is None or (not is_leftover(path) and control.progress(path).complete):
        return
    require_queue()
    with _queue_errors(), suppress(control.JobNotFoundError):  # a forgotten job has nothing left to cancel
        control.cancel(job_id)


def still_building(repository: StoreRepository, name: IndexName) -> str:
    """Why index `name` cannot answer yet and what to do: wait for its job only when one is queued or
    running, else start one (a cancelled, failed or forgotten job builds nothing)."""
    progress = control.progress(repository.path(name))
    building = f"index {name!r} is still being built ({progress.done_rows}/{progress.total_rows} rows done)"
    start = f'start its job with POST /v1/jobs {{"index": "{name}"}}'
    job_id = repository.job_of(name)
    if job_id is None:
        return f"{building}, and no job is building it: {start}"
    try:
        state = control.state(job_id)
    except control.JobNotFoundError:
        return f"{building}, and the queue forgot its job {job_id}: {start}"
    except QUEUE_ERRORS:
        return f"{building}; the job queue does not answer, so its job {job_id} cannot be checked: retry"
    if state in ("queued", "running"):
        return f"{building}; wait for its job {job_id} (GET /v1/jobs/{job_id} shows its progress)"
    return f"{building}, and its job {job_id} is {state}: {start}"


def require_queue() -> None:
    """An Unavailable error if the job queue does not answer now."""
    check = queue_check()
    if not check.ok:
        raise Unavailable(f"{check.detail}; retry when GET /v1/ready says ready")


@contextmanager
def _queue_errors() -> Iterator[None]:
    """The queue's failures as the service's errors: a forgotten job is NotFound, an outage Unavailable."""
    try:
        yield
    except control.JobNotFoundError as error:
        raise NotFound(f"{error}; POST /v1/jobs with the index name resumes it") from error
    except QUEUE_ERRORS as error:
        raise Unavailable(f"the job queue failed ({error}); retry when GET /v1/ready says ready") from error
