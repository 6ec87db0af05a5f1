"""`retrac worker`: start a Celery worker for indexing jobs, with the flags the shard tasks need.

One task at a time per process (prefetch 1), late acknowledgement (set on the app), and the queue
and broker from `worker.settings` (environment `RETRAC_*`). Several processes per machine share its
cores: each computes with `RETRAC_TORCH_THREADS` threads (default 1).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="start a Celery worker that fills gradient stores")
    parser.add_argument("--concurrency", "-c", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--queue", "-Q", help="queue to consume (default: RETRAC_QUEUE or retrac-index)")
    parser.add_argument(
        "--device", help="torch device: auto, cpu, cuda, cuda:1 ... (default: RETRAC_DEVICE or auto)"
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads per process (default: RETRAC_TORCH_THREADS or 1)"
    )
    parser.add_argument("--loglevel", "-l", default="INFO")
    parser.add_argument("--hostname", "-n", help="node name, for several workers on one machine")
    parser.set_defaults(run=_worker)


def _worker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cli.common import first_error
    from retrac.exceptions import SpecError
    from worker.app import app
    from worker.settings import WorkerSettings, get_settings, use_settings

    flags = {"queue": args.queue, "device": args.device, "torch_threads": args.threads}
    try:  # the flags laid over the environment; the app reads them when it starts
        use_settings(WorkerSettings(**{name: value for name, value in flags.items() if value is not None}))
    except ValidationError as error:
        raise SpecError(first_error(error)) from error

    argv = [
        "worker",
        f"--pool={'solo' if args.concurrency == 1 else 'prefork'}",
        f"--concurrency={args.concurrency}",
        "--prefetch-multiplier=1",
        f"--queues={get_settings().queue}",
        f"--loglevel={args.loglevel}",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0
