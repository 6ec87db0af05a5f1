"""Real worker processes for the worker tests: `retrac worker` subprocesses on a queue of their own.

The tests submit through `worker.control` in this process and the workers consume from the same Redis
(database 15 unless RETRAC_BROKER_URL says otherwise), each test on a fresh queue so that tests
running side by side never take each other's tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RETRAC_BROKER_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("RETRAC_RESULT_BACKEND", "redis://127.0.0.1:6379/15")

STARTUP_SECONDS = 90
"""A worker imports torch and diffusers before it answers: allow for a loaded 2-core machine."""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


class Workers:
    """Starts `retrac worker` subprocesses; kills whatever is left when the test ends."""

    def __init__(self, queue: str, logs: Path) -> None:
        self.queue, self.logs = queue, logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.hostnames: dict[str, str] = {}

    def start(self, name: str, *, wait: bool = True, **env: str) -> str:
        """Start worker `name` (with extra RETRAC_* settings); with `wait`, until it answers a ping."""
        from worker.settings import get_settings

        settings = get_settings()
        environment = {
            **os.environ,
            "RETRAC_BROKER_URL": settings.broker_url,
            "RETRAC_RESULT_BACKEND": settings.result_backend,
            **env,
        }
        hostname = f"{name}-{self.queue}@localhost"
        log = (self.logs / f"{name}.log").open("ab")
        command = [sys.executable, "-m", "cli", "worker", "--queue", self.queue, "--hostname", hostname]
        self.processes[name] = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
        self.hostnames[name] = hostname
        if wait and "RETRAC_BROKER_URL" not in env:  # a worker on another broker cannot be pinged from here
            self.wait_ready(name)
        return hostname

    def wait_ready(self, name: str) -> None:
        from worker.app import app

        hostname = self.hostnames[name]
        wait_until(
            lambda: self._alive(name) and bool(app.control.ping([hostname], timeout=0.5)),
            STARTUP_SECONDS,
            f"worker {name} to start (log: {self.logs / name}.log)",
        )

    def _alive(self, name: str) -> bool:
        if self.processes[name].poll() is not None:
            raise AssertionError(f"worker {name} exited: {(self.logs / f'{name}.log').read_text()[-3000:]}")
        return True

    def kill(self, name: str) -> None:
        """SIGKILL: the worker gets no chance to hand back the task it holds."""
        process = self.processes.pop(name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name)


@pytest.fixture
def queue(redis_url: str) -> Iterator[str]:
    """A queue name of this test alone; its leftovers are deleted afterwards."""
    import redis

    from worker.settings import get_settings

    name = f"retrac-test-{uuid.uuid4().hex[:10]}"
    yield name
    redis.Redis.from_url(get_settings().broker_url).delete(name)


@pytest.fixture
def workers(queue: str, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(queue, tmp_path)
    yield started
    started.stop_all()
