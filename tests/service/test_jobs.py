"""Jobs through the API. On the real Redis with no worker running, jobs stay queued, so their state,
cancellation and restart can be checked exactly."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, SlotSpec
from api_schemas.jobs import JobPublic
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, QUERY, index_spec


def still_building(client: TestClient, name: str) -> str:
    """The 409 message of a query on index `name`, which is not complete."""
    image = {"array": [[0.5] * 8] * 8}
    response = client.post(f"/v1/indexes/{name}/attribute", json={**QUERY, "images": [image]})
    assert response.status_code == 409, response.text
    return response.json()["detail"]


@pytest.mark.redis
def test_create_follow_cancel_restart_delete(own_roots: Settings) -> None:
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})

    created = client.post(
        "/v1/indexes", json={"name": "queued", "spec": index_spec().model_dump(mode="json")}
    )
    assert created.status_code == 202, created.text
    assert created.json()["complete"] is False
    assert created.json()["notices"] == []  # digits at their 8 px
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

    assert f"wait for its job {first}" in still_building(client, "queued")

    cancelled = client.delete(f"/v1/jobs/{first}")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    advice = still_building(client, "queued")  # nothing builds it now: say how to
    assert "wait" not in advice
    assert f"its job {first} is cancelled" in advice
    assert "POST /v1/jobs" in advice

    restarted = client.post("/v1/jobs", json={"index": "queued"})
    assert restarted.status_code == 202, restarted.text
    second = restarted.json()["id"]
    assert second != first
    assert restarted.json()["state"] == "queued"
    assert client.get("/v1/indexes/queued").json()["job_id"] == second
    assert f"wait for its job {second}" in still_building(client, "queued")

    assert client.delete("/v1/indexes/queued").status_code == 204  # cancels the second job first
    assert not (own_roots.stores_root / "queued").exists()
    assert client.get(f"/v1/jobs/{second}").status_code == 404


@pytest.mark.redis
def test_the_creation_answer_says_what_loading_the_images_converted(own_roots: Settings) -> None:
    folder = own_roots.data_root / f"rgb-{own_roots.stores_root.parent.name}"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    spec = IndexSpec(
        dataset=DatasetSpec(source=folder.name, resolution=8),
        checkpoints=(CheckpointSpec(path="run/checkpoints/epoch-0002"),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=1),
    )
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})
    created = client.post("/v1/indexes", json={"name": "rgb", "spec": spec.model_dump(mode="json")})
    assert created.status_code == 202, created.text
    assert created.json()["notices"] == [
        f"{folder.name}: 3 of 3 converted from RGB to grey (ITU-R BT.601 luma)",
        f"{folder.name}: 3 of 3 resized from 16x16 to 8x8 px (bilinear)",
    ]
    assert client.delete("/v1/indexes/rgb").status_code == 204


def test_a_complete_index_has_nothing_to_run(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"index": "digits"})
    assert response.status_code == 409
    assert "nothing is left" in response.json()["detail"]
