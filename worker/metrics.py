"""The workers' Prometheus metrics, from Celery's task events: `python -m worker.metrics --port 9808`.

One exporter per broker, beside the workers (compose's `worker-metrics`), not one per worker
process: it reads the events every worker sends (`worker_send_task_events`, `worker.app`) and
serves, on `GET /metrics` of its port:

- `retrac_worker_rows_total{worker}`: rows computed, counted per gradient batch from the shard
  tasks' `task-rows` events; `rate(retrac_worker_rows_total[5m])` is rows per second per worker;
- `retrac_worker_task_duration_seconds{task, state}`: seconds of each task that succeeded or failed;
- `retrac_worker_task_failures_total{task, exception}` and `retrac_worker_task_retries_total{task}`;
- `retrac_workers_online`: workers whose heartbeats arrive.

Events sent while the exporter is down are lost to it (the counters restart, as after any restart of
a Prometheus target); the jobs themselves are unaffected.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.events.state import State
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from worker import logs
from worker.settings import get_settings

ROWS_EVENT = "task-rows"
"""The Celery event a shard task sends after each gradient batch with the `rows` it completed."""
DEFAULT_PORT = 9808
disable_created_metrics()  # `_created` series double every line and tell nothing here
TASK_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)

logger = logging.getLogger(__name__)

Event = dict[str, Any]


class WorkerMetrics:
    """The exporter's metrics, in `registry`, and the event handlers that update them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = State()
        self.rows = Counter(
            "retrac_worker_rows",
            "Rows (sample x checkpoint) computed by each worker",
            ("worker",),
            registry=registry,
        )
        self.durations = Histogram(
            "retrac_worker_task_duration_seconds",
            "Seconds a task ran, by task name and how it ended (succeeded, failed)",
            ("task", "state"),
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "retrac_worker_task_failures",
            "Tasks that failed, by task name and exception",
            ("task", "exception"),
            registry=registry,
        )
        self.retries = Counter(
            "retrac_worker_task_retries",
            "Tasks retried after a transient error",
            ("task",),
            registry=registry,
        )
        online = Gauge("retrac_workers_online", "Workers whose heartbeats arrive", registry=registry)
        online.set_function(lambda: sum(1 for w in self.state.workers.values() if w.alive))

    def handlers(self) -> dict[str, Callable[[Event], None]]:
        return {"*": self.handle}

    def handle(self, event: Event) -> None:
        """Update the metrics from one event (every kind passes through the event state)."""
        self.state.event(event)
        kind = event.get("type", "")
        if kind == ROWS_EVENT:
            self.rows.labels(event.get("hostname", "unknown")).inc(int(event.get("rows", 0)))
            return
        task = self.state.tasks.get(event.get("uuid", ""))
        name = (task.name if task is not None else None) or "unknown"
        if kind == "task-succeeded":
            self.durations.labels(name, "succeeded").observe(float(event.get("runtime") or 0.0))
        elif kind == "task-failed":
            exception = str(event.get("exception", "")).split("(", 1)[0] or "unknown"
            self.failures.labels(name, exception).inc()
            started = task.started if task is not None else None
            if started:
                self.durations.labels(name, "failed").observe(max(0.0, float(event["timestamp"]) - started))
        elif kind == "task-retried":
            self.retries.labels(name).inc()


def consume(
    app: Celery,
    metrics: WorkerMetrics,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> None:
    """Read the broker's events into `metrics` until `stop` is set (or forever); `ready` is set once
    the receiver listens (events are broadcast: those sent before then are never seen)."""
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers=metrics.handlers())
        if ready is not None:
            listening = receiver.on_consume_ready

            def on_consume_ready(*args: Any, **kwargs: Any) -> None:
                listening(*args, **kwargs)
                ready.set()

            receiver.on_consume_ready = on_consume_ready
        if stop is not None:

            def stop_when_asked() -> None:
                stop.wait()
                receiver.should_stop = True

            threading.Thread(target=stop_when_asked, daemon=True).start()
        receiver.capture(limit=None, timeout=None, wakeup=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of GET /metrics")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logs.configure(get_settings().log_format)
    from worker.app import app

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    start_http_server(arguments.port, addr=arguments.host, registry=registry)
    logger.info("worker metrics on :%d/metrics, from the events of %s", arguments.port, app.conf.broker_url)
    consume(app, metrics)


if __name__ == "__main__":
    main()
