"""A store damaged while the service holds it resident is refused, never answered from changed
files: every diagnostic that reads stored rows answers a 409 naming the damaged shard."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api_schemas.indexes import IndexCreate
from retrac.computers import GradientComputerCache
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from storage import run_pending
from tests.service.conftest import API_KEY, index_spec
from tests.storage.helpers import data_files

NAME, CHECKPOINT, SHARD = "resident", 1, 2
"""The index, and the shard of it that is damaged (the last of the 3 shards of 16 rows)."""
READS = (
    f"/v1/indexes/{NAME}/diagnostics/norms?checkpoint={CHECKPOINT}",
    f"/v1/indexes/{NAME}/diagnostics/self-influence",
)


def test_norms_zeroed_under_a_resident_store_are_refused_naming_the_shard(own_roots: Settings) -> None:
    store = StoreRepository(own_roots).create(IndexCreate(name=NAME, spec=index_spec()))
    run_pending(store, GradientComputerCache("cpu", threads=1))
    with TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY}) as client:
        for url in READS:  # served once: the store is resident in the service now
            assert client.get(url).status_code == 200, url
        norms = data_files(store.location.folder, CHECKPOINT, SHARD)[1]
        norms.write_bytes(bytes(norms.stat().st_size))
        for url in READS:
            response = client.get(url)
            assert response.status_code == 409, (url, response.text)
            assert f"checkpoint {CHECKPOINT} shard {SHARD} " in response.json()["detail"], url
            assert "`retrac index run" in response.json()["detail"], url
