"""`retrac worker`: start a Celery worker for indexing jobs, with the flags the shard tasks need.

One task at a time per process (prefetch 1), late acknowledgement (set on the app), and the queue
and broker from `worker.settings` (environment `RETRAC_*`). Several processes per machine share its
cores: each computes with `RETRAC_TORCH_THREADS` threads (default 1).
"""

from __future__ import annotations

import argparse
import os


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
    # Settings are read when the app is imported: apply the flags to the environment first.
    for name, value in (
        ("RETRAC_QUEUE", args.queue),
        ("RETRAC_DEVICE", args.device),
        ("RETRAC_TORCH_THREADS", args.threads),
    ):
        if value is not None:
            os.environ[name] = str(value)
    from worker.app import app
    from worker.settings import get_settings

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
