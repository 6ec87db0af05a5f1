"""The whole deployment on loopback: `retrac serve` (real uvicorn) and `retrac worker` (real Celery on the
real Redis) index a tiny model's dataset on request, then answer a query exactly as the engine does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from api_schemas.attribution import AttributionsPublic
from api_schemas.jobs import JobPublic
from retrac.attribution import Attributor
from retrac.replay import TrainingRun
from tests.service.conftest import API_KEY, QUERY, index_spec
from tests.service.servers import free_port
from tests.service.test_attribute import assert_matches, digit_pixels, expected, png
from tests.worker.conftest import STARTUP_SECONDS, Workers, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

JOB_SECONDS = 240
"""Indexing 48 samples x 3 checkpoints x 3 slots on a loaded 2-core machine takes well under this."""


class Server:
    """`retrac serve` (or another server `module` taking the port first, then `arguments`) in a
    subprocess on a free loopback port."""

    def __init__(
        self, env: dict[str, str], log: Path, *, module: str = "", arguments: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        if module:
            command = [sys.executable, "-m", module, str(self.port), *arguments]
        else:
            command = [sys.executable, "-m", "cli", "serve", "--port", str(self.port)]
            command += ["--log-level", "warning"]
        self.process = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"retrac serve exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/v1/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def service_environment(tmp_path: Path, tiny_run: TrainingRun, queue: str) -> tuple[dict[str, str], Path]:
    """The environment of a `retrac serve` and its workers on `queue`: a copy of `tiny_run` under a
    models root, an empty stores root (returned too), the data root `tmp_path`, the test API key."""
    from worker.settings import get_settings

    models, stores = tmp_path / "models", tmp_path / "stores"
    shutil.copytree(tiny_run.folder, models / "run")
    stores.mkdir()
    settings = get_settings()
    return {
        **os.environ,
        "RETRAC_QUEUE": queue,
        "RETRAC_BROKER_URL": settings.broker_url,
        "RETRAC_RESULT_BACKEND": settings.result_backend,
        "RETRAC_STORES_ROOT": str(stores),
        "RETRAC_MODELS_ROOT": str(models),
        "RETRAC_DATA_ROOT": str(tmp_path),
        "RETRAC_API_KEY": API_KEY,
    }, stores


@pytest.fixture
def deployment(tmp_path: Path, tiny_run: TrainingRun, redis_url: str) -> Iterator[tuple[Server, Path]]:
    """A server and one worker sharing a queue of their own, and the server's stores root."""
    queue = f"retrac-service-test-{uuid.uuid4().hex[:10]}"
    env, stores = service_environment(tmp_path, tiny_run, queue)
    workers = Workers(queue, tmp_path)
    server = Server(env, tmp_path / "server.log")
    try:
        workers.start("worker")  # stores are named by absolute path in its tasks: it needs no roots
        wait_until(server.ready, STARTUP_SECONDS, f"retrac serve to be ready (log: {server.log})")
        yield server, stores
    finally:
        server.stop()
        workers.stop_all()
        redis.Redis.from_url(env["RETRAC_BROKER_URL"]).delete(queue)


def test_index_then_query_over_http_equals_the_engine(
    deployment: tuple[Server, Path], reference: Attributor
) -> None:
    server, stores = deployment
    api = httpx.Client(base_url=f"{server.url}/v1", headers={"X-API-Key": API_KEY}, timeout=300)

    created = api.post("/indexes", json={"name": "e2e", "spec": index_spec().model_dump(mode="json")})
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]

    def job() -> JobPublic:
        response = api.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return JobPublic.model_validate(response.json())

    wait_until(lambda: job().state == "done", JOB_SECONDS, "the indexing job")
    finished = job()
    assert (finished.done, finished.total, finished.fraction, finished.index) == (48 * 3, 48 * 3, 1.0, "e2e")
    assert api.get("/indexes/e2e").json()["complete"] is True

    pixels = digit_pixels(reference, 4)
    response = api.post(
        "/indexes/e2e/attribute/upload", files={"images": ("q.png", png(pixels), "image/png")}, data=QUERY
    )
    assert response.status_code == 200, response.text
    assert_matches(AttributionsPublic.model_validate(response.json()), expected(reference, [pixels]))

    assert api.delete("/indexes/e2e").status_code == 204
    assert not (stores / "e2e").exists()
    assert api.get("/indexes/e2e").status_code == 404
