"""Jobs through the API. On the real Redis with no worker running, jobs stay queued, so their state,
cancellation and restart can be checked exactly."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api_schemas.jobs import JobPublic
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, index_spec


@pytest.mark.redis
def test_create_follow_cancel_restart_delete(own_roots: Settings) -> None:
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})

    created = client.post(
        "/v1/indexes", json={"name": "queued", "spec": index_spec().model_dump(mode="json")}
    )
    assert created.status_code == 202, created.text
    assert created.json()["complete"] is False
    first = created.json()["job_id"]
    job = JobPublic.model_validate(client.get(f"/v1/jobs/{first}").json())
    assert (job.state, job.index, job.done, job.total, job.fraction, job.eta_s) == (
        "queued",
        "queued",
        0,
        144,
        0.0,
        None,
    )

    cancelled = client.delete(f"/v1/jobs/{first}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

    restarted = client.post("/v1/jobs", json={"index": "queued"})
    assert restarted.status_code == 202, restarted.text
    second = restarted.json()["id"]
    assert second != first and restarted.json()["state"] == "queued"
    assert client.get("/v1/indexes/queued").json()["job_id"] == second

    assert client.delete("/v1/indexes/queued").status_code == 204  # cancels the second job first
    assert not (own_roots.stores_root / "queued").exists()
    assert client.get(f"/v1/jobs/{second}").status_code == 404


def test_a_complete_index_has_nothing_to_run(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"index": "digits"})
    assert response.status_code == 409 and "nothing is left" in response.json()["detail"]
