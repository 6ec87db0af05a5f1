"""The Celery app, configured from `WorkerSettings` when it is first used (not when imported, so the
command line can choose the settings first). Start workers with `retrac worker`.

Delivery rules for idempotent shard tasks: acknowledged late (after the shard is stored), rejected
back to the queue when the worker process dies, one task prefetched at a time, and a task held by a
worker that vanished (SIGKILL, lost machine) is handed out again after the visibility timeout.
Task events are on (Flower, `worker.metrics`); log lines carry each task's job and request id.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_ready, worker_shutdown

from worker import health, logs
from worker.settings import get_settings

TASK_LOG_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s] "
    "job=%(job)s index=%(index)s request=%(request_id)s: %(message)s"
)
"""Celery's task log line with the job, index and request id each shard task binds (`worker.logs`)."""


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
        # Events on, as Flower and `worker.metrics` need them: every task's sent, started, succeeded,
        # failed and retried events, and the shard tasks' own `task-rows`.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_task_log_format=TASK_LOG_FORMAT,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for abandoned tasks at a quarter of the timeout (at most every 10 s), every sweep.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
        },
    )


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_lines(logger: logging.Logger, **_: Any) -> None:
    """Celery's handlers get the bound fields; `RETRAC_LOG_FORMAT=json` replaces them with JSON lines."""
    for handler in logger.handlers:
        handler.addFilter(logs.ContextFilter())
    if get_settings().log_format == "json":
        logs.configure("json")


worker_ready.connect(health.start_heartbeat)  # the health check's heartbeat, from the worker's start
worker_shutdown.connect(health.stop_heartbeat)

app = Celery("retrac", include=["worker.tasks"])
app.add_defaults(configuration)  # a callable is read lazily, on the first use of `app.conf`
