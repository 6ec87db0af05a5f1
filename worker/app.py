"""The Celery app, configured from `WorkerSettings` when it is first used (not when imported, so the
command line can choose the settings first). Start workers with `retrac worker`.

Delivery rules for idempotent shard tasks: acknowledged late (after the shard is stored), rejected
back to the queue when the worker process dies, one task prefetched at a time, and a task held by a
worker that vanished (SIGKILL, lost machine) is handed out again after the visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.settings import get_settings


def configuration() -> dict[str, Any]:
    """Celery's settings, from this process's `WorkerSettings`."""
    settings = get_settings()
    return dict(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for abandoned tasks at a quarter of the timeout (at most every 10 s), every sweep.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
        },
    )


app = Celery("retrac", include=["worker.tasks"])
app.add_defaults(configuration)  # a callable is read lazily, on the first use of `app.conf`
