"""Fixtures of the service tests: roots with a copy of `tiny_run`, a built index, apps and clients.

The built index is filled by the embedded runner (no queue), so most tests need no Redis; its
reference is the engine's in-memory `Attributor` over the same plan.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api_schemas import IndexSpec, ProjectorSpec, SlotSpec
from api_schemas.indexes import IndexCreate
from retrac.attribution import Attributor
from retrac.computers import GradientComputerCache
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from storage import run_pending
from tests.conftest import TINY_DATASET

API_KEY = "service-test-key-0123456789"
INDEX = "digits"
BUILDING = "digits-building"
QUERY = {"timesteps": 5, "draws": 2, "seed": 7, "top_k": 5}
"""Query knobs small enough for 2 CPU cores."""
HEAVY = {**QUERY, "timesteps": 16, "draws": 4}
"""K*M = 64, the test settings' limit: a query whose gradients last long enough to be killed midway or
waited for (about 0.5 CPU seconds for 4 images)."""


def body(seed: int, images: int = 1, query: dict = QUERY) -> dict:
    """A JSON query of different images (and noise seed) per seed, so that a mixed-up answer would show."""
    pixels = np.random.default_rng(seed).random((images, 8, 8)).round(3)
    return {**query, "seed": seed, "images": [{"array": p.tolist()} for p in pixels]}


def assert_create_refused(settings: Settings, name: str, spec: dict, message: str) -> None:
    """POST /v1/indexes of `spec` answers a 422 whose one-line detail holds `message`, and writes nothing."""
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as session:
        response = session.post("/v1/indexes", json={"name": name, "spec": spec})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail, detail
    assert message in detail, detail
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
    run_pending(
        repository.create(IndexCreate(name=INDEX, spec=index_spec())), GradientComputerCache("cpu", threads=1)
    )
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


def assert_wait_reported_apart(
    client: TestClient, heavy: list[dict], light: dict, computing: Callable[[], Callable[[], None]]
) -> None:
    """Send the `heavy` queries at once, then the `light` one once their gradients are under way (the
    function that `computing()`, called before they are sent, returns has returned): the light one waits
    for a heavy one's gradients to end, and its timings report that wait in `wait_s`, apart from its own
    `gradient_s`.

    No heavy query's gradients end before it was sent plus its own wait and gradients, so the light
    one's gradients cannot start before the earliest such time: its gradients and scan fit between
    then and its answer (a wait counted into its gradients would overflow that span by the wait).
    """
    url = f"/v1/indexes/{INDEX}/attribute"
    with ThreadPoolExecutor(len(heavy)) as threads:
        under_way = computing()
        sent = time.perf_counter()
        pending = [threads.submit(client.post, url, json=request) for request in heavy]
        under_way()
        light_answer = client.post(url, json=light)
        answered = time.perf_counter()
        heavy_timings = [future.result().json()["timings"] for future in pending]
    assert light_answer.status_code == 200, light_answer.text
    timings = light_answer.json()["timings"]
    released = sent + min(t["wait_s"] + t["gradient_s"] for t in heavy_timings)
    assert timings["gradient_s"] + timings["scan_s"] <= answered - released, (timings, heavy_timings)
    assert timings["wait_s"] > 0
    assert timings["total_s"] >= timings["wait_s"] + timings["gradient_s"] + timings["scan_s"]


def wait_until(condition: Callable[[], bool]) -> None:
    """Return once `condition()` holds (polled every 5 ms)."""
    while not condition():
        time.sleep(0.005)
