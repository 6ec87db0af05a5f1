"""Fixtures of the service tests: roots with a copy of `tiny_run`, a built index, apps and clients.

The built index is filled by the embedded runner (no queue), so most tests need no Redis; its
reference is the engine's in-memory `Attributor` over the same plan.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api_schemas import IndexSpec, ProjectorSpec, SlotSpec
from api_schemas.indexes import IndexCreate
from retrac.attribution import Attributor
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from retrac.computers import GradientComputerCache
from storage import run_pending
from tests.conftest import TINY_DATASET

API_KEY = "service-test-key-0123456789"
INDEX = "digits"
BUILDING = "digits-building"
QUERY = {"timesteps": 5, "draws": 2, "seed": 7, "top_k": 5}
"""Query knobs small enough for 2 CPU cores."""


def assert_create_refused(settings: Settings, name: str, spec: dict, message: str) -> None:
    """POST /v1/indexes of `spec` answers a 422 whose one-line detail holds `message`, and writes nothing."""
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as session:
        response = session.post("/v1/indexes", json={"name": name, "spec": spec})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and message in detail, detail
    assert not (settings.stores_root / name).exists()


def index_spec(run: str = "run") -> IndexSpec:
    """The test index: replayed and grid slots (so self-influence works), float32 (so scores match the
    in-memory engine to float rounding), a count sketch of 256 dims, shards of 16 rows."""
    return IndexSpec(
        dataset=TINY_DATASET,
        run=run,
        slots=SlotSpec(replay=True, grid=2, seed=1),
        projector=ProjectorSpec(kind="sketch", dim=256, seed=3),
        dtype="float32",
        shard_size=16,
    )


@dataclass(frozen=True)
class Roots:
    models: Path
    data: Path
    stores: Path


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_run: TrainingRun) -> Roots:
    """Models, data and stores roots; the models root holds a copy of `tiny_run` as `run`."""
    base = tmp_path_factory.mktemp("service")
    found = Roots(models=base / "models", data=base / "data", stores=base / "stores")
    shutil.copytree(tiny_run.folder, found.models / "run")
    found.data.mkdir()
    found.stores.mkdir()
    return found


@pytest.fixture(scope="session")
def settings(roots: Roots) -> Settings:
    return Settings(
        stores_root=roots.stores,
        models_root=roots.models,
        data_root=roots.data,
        api_key=API_KEY,
        max_images=4,
        max_top_k=20,
        max_query_gradients=64,
        max_upload_bytes=256 << 10,
    )


@pytest.fixture
def own_roots(settings: Settings, tmp_path: Path) -> Settings:
    """Settings with a stores root and a models root (a copy of the run) of this test alone."""
    shutil.copytree(settings.models_root / "run", tmp_path / "models" / "run")
    (tmp_path / "stores").mkdir()
    return settings.model_copy(
        update={"stores_root": tmp_path / "stores", "models_root": tmp_path / "models"}
    )


@pytest.fixture(scope="session")
def built_index(settings: Settings) -> str:
    """Index `digits`, complete, and index `digits-building`, created but never filled."""
    repository = StoreRepository(settings)
    run_pending(repository.create(IndexCreate(name=INDEX, spec=index_spec())), GradientComputerCache("cpu", threads=1))
    repository.create(IndexCreate(name=BUILDING, spec=index_spec()))
    return INDEX


@pytest.fixture(scope="session")
def app(settings: Settings, built_index: str) -> FastAPI:
    return create_app(settings)


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    """An httpx client on the ASGI app, sending the API key."""
    with TestClient(app, headers={"X-API-Key": API_KEY}) as session:
        yield session


@pytest.fixture(scope="session")
def reference(settings: Settings, built_index: str) -> Attributor:
    """The engine's in-memory attribution over the same plan as the built index."""
    plan = IndexPlan.resolve(StoreRepository(settings).confine(index_spec()))
    attributor = Attributor(plan)
    attributor.index()
    return attributor
