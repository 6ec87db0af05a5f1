"""A delete killed partway (SIGKILL of the service process at each of its steps) while a real worker
fills the index on the real Redis: afterwards the restarted service lists the indexes (what a kill
left is listed as broken, with the reason), each deletes, and the name can be recreated and filled
to exactly the bytes an undisturbed run writes."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from celery.result import GroupResult

from api_schemas import SlotSpec
from api_schemas.indexes import IndexCreate
from retrac.computers import GradientComputerCache
from retrac.replay import TrainingRun
from service.repository import StoreRepository
from service.settings import Settings
from storage import GradientStore, run_pending
from tests.service.conftest import API_KEY, index_spec
from tests.service.test_end_to_end import Server, service_environment
from tests.storage.helpers import store_bytes
from tests.worker.conftest import STARTUP_SECONDS, Workers, wait_until
from worker import control
from worker.app import app as celery_app

pytestmark = [pytest.mark.redis, pytest.mark.slow]

STEPS = ("marked", "cancelled", "removing")
"""Where `tests.service.killing_server` kills the delete (see there)."""
JOB_SECONDS = 180
SPEC = index_spec().model_copy(
    update={
        "dataset": index_spec().dataset.model_copy(update={"limit": 32}),
        "slots": SlotSpec(replay=True),
        "shard_size": 8,
    }
)
"""32 samples, one replayed slot, shards of 8 rows: 12 shards, a job of seconds."""


def job_went_through(job_id: str) -> bool:
    return all(task.ready() for task in GroupResult.restore(job_id, app=celery_app).results)


def test_a_delete_killed_at_any_step_leaves_every_index_usable(tmp_path: Path, tiny_run: TrainingRun) -> None:
    from worker.settings import get_settings

    queue = f"retrac-kill-test-{uuid.uuid4().hex[:10]}"
    env, stores = service_environment(tmp_path, tiny_run, queue)
    models, settings = tmp_path / "models", get_settings()
    body = {"spec": SPEC.model_dump(mode="json")}
    workers = Workers(queue, tmp_path)
    servers: list[Server] = []
    try:
        workers.start("worker")
        first_jobs = []
        for step in STEPS:
            log = tmp_path / f"{step}.log"
            server = Server(env, log, module="tests.service.killing_server", arguments=(step,))
            servers.append(server)
            wait_until(server.ready, STARTUP_SECONDS, f"the server killed at {step!r} to be ready")
            api = httpx.Client(base_url=f"{server.url}/v1", headers={"X-API-Key": API_KEY}, timeout=60)
            created = api.post("/indexes", json={"name": step, **body})
            assert created.status_code == 202, created.text
            first_jobs.append(created.json()["job_id"])
            path = stores / step
            wait_until(lambda: control.progress(path).done_shards >= 1, JOB_SECONDS, "a first shard")  # noqa: B023 (waited on here)
            with pytest.raises(httpx.TransportError):  # the process dies inside the delete
                api.delete(f"/indexes/{step}")
            assert server.process.wait(timeout=30) == -signal.SIGKILL
        assert list(stores.glob(".deleted-removing-*"))  # the last kill landed after the move aside

        restarted = Server(env, tmp_path / "restarted.log")
        servers.append(restarted)
        wait_until(restarted.ready, STARTUP_SECONDS, "the restarted server to be ready")
        api = httpx.Client(base_url=f"{restarted.url}/v1", headers={"X-API-Key": API_KEY}, timeout=60)
        listed = api.get("/indexes")
        assert listed.status_code == 200, listed.text
        assert listed.json()["data"] == []
        broken = {b["name"]: b["reason"] for b in listed.json()["broken"]}
        assert {"marked", "cancelled"} <= set(broken) <= set(STEPS)  # "removing" if a worker wrote after
        assert all("interrupted deletion" in why and "DELETE /v1/indexes/" in why for why in broken.values())
        for step in STEPS:
            assert api.get(f"/indexes/{step}").status_code == 404  # half deleted is never served

        wait_until(
            lambda: all(job_went_through(j) for j in first_jobs),
            JOB_SECONDS,
            "the worker to drop the old jobs",
        )
        for step in STEPS:
            left = step in broken or (stores / step).exists()
            deleted = api.delete(f"/indexes/{step}")
            assert deleted.status_code == (204 if left else 404), deleted.text
        assert sorted(p.name for p in stores.iterdir()) == [".jobs"]  # nothing left, nor anything set aside
        assert api.get("/indexes").json() == {"data": [], "count": 0, "broken": []}

        recreated = api.post("/indexes", json={"name": "marked", **body})
        assert recreated.status_code == 202, recreated.text
        job_id = recreated.json()["job_id"]
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["state"] == "done", JOB_SECONDS, "the new job")
    finally:
        for server in servers:
            server.stop()
        workers.stop_all()
        redis.Redis.from_url(settings.broker_url).delete(queue)

    reference = StoreRepository(
        Settings(stores_root=tmp_path / "reference", models_root=models, data_root=tmp_path)
    ).create(IndexCreate(name="reference", spec=SPEC))
    run_pending(reference, GradientComputerCache("cpu", threads=1))
    assert GradientStore.open(stores / "marked").status(verify=True).complete
    assert store_bytes(stores / "marked") == store_bytes(reference.path)  # no old row survived
