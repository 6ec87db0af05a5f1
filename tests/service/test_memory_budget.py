"""A query whose gradients cannot fit the service's memory budget is a 422 in one line."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, INDEX, body


def test_a_query_past_the_budget_is_a_422(settings: Settings, built_index: str) -> None:
    tight = settings.model_copy(update={"memory_budget": 64 << 20})
    with TestClient(create_app(tight), headers={"X-API-Key": API_KEY}) as client:
        response = client.post(f"/v1/indexes/{INDEX}/attribute", json=body(3))
    assert response.status_code == 422, response.text
    assert "the memory budget is 64 MiB" in response.json()["detail"]
