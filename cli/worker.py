"""`retrac worker`: start a Celery worker for indexing jobs, with the flags the shard tasks need.

One task at a time per process (prefetch 1), late acknowledgement (set on the app), and the queue
and broker from `worker.settings` (environment `RETRAC_*`). Several processes per machine share its
cores: each computes with `RETRAC_TORCH_THREADS` threads (default 1).
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import first_error, typed
from cli.options import MemoryBudget
from worker.settings import WorkerSettings


def from_environment(variable: str, field: str) -> str:
    """`--help`'s default for a flag that, unset, leaves the setting to the environment."""
    return f"{variable} or {WorkerSettings.model_fields[field].default}"


def register(app: typer.Typer) -> None:
    app.command(
        "worker",
        help="Start a Celery worker that fills gradient stores.",
        short_help="start a Celery worker that fills gradient stores",
    )(start_worker)


def start_worker(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="worker processes")] = 1,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue", "-Q", help="queue to consume", show_default=from_environment("RETRAC_QUEUE", "queue")
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="torch device: auto, cpu, cuda, cuda:1 ...",
            show_default=from_environment("RETRAC_DEVICE", "device"),
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads per process",
            show_default=from_environment("RETRAC_TORCH_THREADS", "torch_threads"),
        ),
    ] = None,
    memory_budget: MemoryBudget = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="Celery log level")] = "INFO",
    hostname: Annotated[
        str | None, typer.Option("--hostname", "-n", help="node name, for several workers on one machine")
    ] = None,
) -> int:
    from pydantic import ValidationError

    from retrac.exceptions import SpecError
    from worker.app import app
    from worker.settings import get_settings, use_settings

    try:  # the flags laid over the environment; the app reads them when it starts
        flags = typed(queue=queue, device=device, torch_threads=threads, memory_budget=memory_budget)
        use_settings(WorkerSettings(**flags))
    except ValidationError as error:
        raise SpecError(first_error(error)) from error

    argv = [
        "worker",
        f"--pool={'solo' if concurrency == 1 else 'prefork'}",
        f"--concurrency={concurrency}",
        "--prefetch-multiplier=1",
        f"--queues={get_settings().queue}",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)
    return 0
