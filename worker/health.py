"""Health checks of the image's two roles: `python -m worker.health [--role worker|api]`, exit 0 if healthy.

A worker is healthy while its heartbeat file is fresh: a thread of the worker's main process,
started once the worker consumes its queue (`worker_ready`, connected by `worker.app`), touches
`RETRAC_HEARTBEAT_FILE` every `HEARTBEAT_S` seconds, also while a task runs (a solo pool, one task
at a time, answers no `celery inspect ping` then). The API is healthy when `GET /v1/health` on port
8000 answers. Without `--role`, the role is read from the container's first process (`retrac
worker ...` is a worker), so the image's one `HEALTHCHECK` fits both `docker run retrac` and
`docker run retrac retrac worker`.
"""

from __future__ import annotations

import argparse
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Literal

from worker.settings import get_settings

HEARTBEAT_S = 10.0
STALE_S = 60.0
"""A heartbeat older than this means the worker's process hangs or is gone."""
API_HEALTH = "http://127.0.0.1:8000/v1/health"

Role = Literal["worker", "api"]

_stop = threading.Event()


def beat(file: Path, stop: threading.Event, every: float = HEARTBEAT_S) -> None:
    """Touch `file` every `every` seconds until `stop` is set."""
    file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        file.touch()
        if stop.wait(every):
            return


def start_heartbeat(**_: Any) -> None:
    """The worker's heartbeat thread (`worker.app` connects this to `worker_ready`)."""
    thread = threading.Thread(
        target=beat, args=(get_settings().heartbeat_file, _stop), name="retrac-heartbeat", daemon=True
    )
    thread.start()


def stop_heartbeat(**_: Any) -> None:
    _stop.set()


def worker_healthy(file: Path, now: float | None = None) -> bool:
    """Whether `file` was touched less than `STALE_S` ago."""
    try:
        age = (time.time() if now is None else now) - file.stat().st_mtime
    except OSError:
        return False
    return age < STALE_S


def api_healthy(url: str = API_HEALTH) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=4) as answer:  # noqa: S310 - a fixed loopback URL
            return bool(answer.status == 200)
    except OSError:
        return False


def container_role(cmdline: Path = Path("/proc/1/cmdline")) -> Role:
    """`worker` if the container's first process runs `retrac worker` (or `celery ... worker`)."""
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return "api"
    return "worker" if b"worker" in argv else "api"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("worker", "api"), help="default: the container's first process")
    role = parser.parse_args(argv).role or container_role()
    healthy = worker_healthy(get_settings().heartbeat_file) if role == "worker" else api_healthy()
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
