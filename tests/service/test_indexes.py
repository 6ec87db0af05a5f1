"""Listing and describing indexes, reading health, and the settings' safety rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec
from api_schemas.indexes import IndexCreate, IndexesPublic, IndexPublic
from cli import main
from retrac.exceptions import SpecError
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from storage import GradientStore
from storage.store import mark_deleted
from tests.service.conftest import API_KEY, BUILDING, INDEX, assert_create_refused, index_spec


def test_health(client: TestClient) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_list_shows_complete_and_building_indexes(client: TestClient, settings: Settings) -> None:
    listed = IndexesPublic.model_validate(client.get("/v1/indexes").json())
    assert listed.count == len(listed.data) == 2
    by_name = {i.name: i for i in listed.data}
    assert by_name[INDEX].complete
    assert not by_name[BUILDING].complete
    assert all(c.done == 0 and c.total == 48 for c in by_name[BUILDING].progress)


def test_describe_matches_the_store(client: TestClient, settings: Settings) -> None:
    described = IndexPublic.model_validate(client.get(f"/v1/indexes/{INDEX}").json())
    store = GradientStore.open(settings.stores_root / INDEX)
    assert described.spec == store.spec
    assert (described.num_samples, described.num_checkpoints, described.num_slots, described.dim) == (
        store.num_rows,
        store.num_checkpoints,
        store.num_slots,
        store.dim,
    )
    assert described.size_bytes == store.size_bytes() > 0
    assert [p.weight for p in described.progress] == store.weights
    assert [p.epoch for p in described.progress] == [2, 4, 6]
    assert all(p.complete and p.done == p.total == 48 for p in described.progress)
    assert described.spec.run == str(settings.models_root / "run")  # stored absolute, confined to the root


def test_reads_need_the_key_only_when_queries_are_protected(client: TestClient, settings: Settings) -> None:
    open_reads = TestClient(create_app(settings))
    assert open_reads.get("/v1/indexes").status_code == 200
    guarded = TestClient(create_app(settings.model_copy(update={"protect_queries": True})))
    assert guarded.get("/v1/indexes").status_code == 401
    assert (
        guarded.get("/v1/indexes", headers={"X-API-Key": settings.api_key.get_secret_value()}).status_code
        == 200
    )
    assert guarded.get("/v1/health").status_code == 200


def test_production_refuses_unsafe_settings(tmp_path) -> None:
    with pytest.raises(ValidationError, match="RETRAC_API_KEY"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="CORS"):
        Settings(environment="production", api_key="k" * 20, cors_origins=["*"])
    assert Settings(environment="production", api_key="k" * 20).api_key is not None


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("RETRAC_STORES_ROOT", str(tmp_path))
    monkeypatch.setenv("RETRAC_MAX_TOP_K", "7")
    monkeypatch.setenv("RETRAC_CORS_ORIGINS", '["http://example.org"]')
    read = Settings()
    assert (read.stores_root, read.max_top_k, read.cors_origins) == (
        tmp_path.resolve(),
        7,
        ["http://example.org"],
    )


def test_an_index_recreated_elsewhere_is_reopened(own_roots: Settings) -> None:
    client = TestClient(create_app(own_roots))
    other_process = StoreRepository(own_roots)
    other_process.create(IndexCreate(name="x", spec=index_spec()))
    assert client.get("/v1/indexes/x").json()["spec"]["projector"]["seed"] == 3
    other_process.delete("x")
    reseeded = index_spec().model_copy(update={"projector": ProjectorSpec(kind="sketch", dim=256, seed=4)})
    other_process.create(IndexCreate(name="x", spec=reseeded))
    assert client.get("/v1/indexes/x").json()["spec"]["projector"]["seed"] == 4


def test_a_changed_checkpoint_makes_the_index_stale(own_roots: Settings) -> None:
    client = TestClient(create_app(own_roots))
    StoreRepository(own_roots).create(IndexCreate(name="x", spec=index_spec()))
    assert client.get("/v1/indexes/x").status_code == 200
    config = own_roots.models_root / "run" / "checkpoints" / "epoch-0004" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "norm_eps": 1e-6}))
    response = client.get("/v1/indexes/x")
    assert response.status_code == 409
    assert "stale" in response.json()["detail"]
    listed = client.get("/v1/indexes").json()
    assert listed["count"] == 0  # left out of the list, not an error
    assert listed["broken"][0]["name"] == "x"
    assert "stale" in listed["broken"][0]["reason"]


def test_a_half_deleted_store_is_listed_as_broken_and_its_name_freed(
    own_roots: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """What an rmtree racing a worker left (the issue): zarr.json present, arrays gone."""
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})
    repository = StoreRepository(own_roots)
    for name in ("x", "y"):
        repository.create(IndexCreate(name=name, spec=index_spec()))
    shutil.rmtree(own_roots.stores_root / "x" / "checkpoints" / "1")
    listed = client.get("/v1/indexes")
    assert listed.status_code == 200
    assert [i["name"] for i in listed.json()["data"]] == ["y"]
    assert [b["name"] for b in listed.json()["broken"]] == ["x"]
    assert "delete it and create it again" in listed.json()["broken"][0]["reason"]
    assert str(own_roots.stores_root) not in listed.text  # no server path
    assert main(["index", "status", str(own_roots.stores_root / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "checkpoint 1 has no" in error
    assert client.delete("/v1/indexes/x").status_code == 204
    assert sorted(p.name for p in own_roots.stores_root.iterdir()) == ["y"]


def test_a_leftover_folder_does_not_block_a_new_index(own_roots: Settings) -> None:
    """A worker that passed its last check before a delete may leave a shard under the old name."""
    leftover = own_roots.stores_root / "x" / "checkpoints" / "0" / "projected" / "c" / "0" / "0"
    leftover.mkdir(parents=True)
    (leftover / "0").write_bytes(b"old rows")
    repository = StoreRepository(own_roots)
    assert repository.names() == []
    repository.create(IndexCreate(name="x", spec=index_spec()))
    assert len(GradientStore.open(own_roots.stores_root / "x").pending()) == 3 * 3  # fresh, empty
    assert not (leftover / "0").exists()


def test_what_an_interrupted_delete_left_is_listed_and_deletes(own_roots: Settings) -> None:
    """A delete killed after its mark (the store is still whole), or after moving the store aside
    (`test_delete_kill` kills real processes at each step)."""
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})
    repository = StoreRepository(own_roots)
    for name in ("x", "y"):
        repository.create(IndexCreate(name=name, spec=index_spec()))
    mark_deleted(own_roots.stores_root / "x")
    aside = own_roots.stores_root / ".deleted-z-0123abcd" / "checkpoints"
    aside.mkdir(parents=True)
    listed = client.get("/v1/indexes").json()
    assert [i["name"] for i in listed["data"]] == ["y"]
    assert [b["name"] for b in listed["broken"]] == ["x"]
    assert "DELETE /v1/indexes/x removes it" in listed["broken"][0]["reason"]
    assert client.get("/v1/indexes/x").status_code == 404  # never served half deleted
    assert client.delete("/v1/indexes/x").status_code == 204
    assert sorted(p.name for p in own_roots.stores_root.iterdir()) == ["y"]  # the set-aside folder too
    assert client.get("/v1/indexes").json()["broken"] == []


@pytest.mark.redis
def test_ready_when_queue_and_stores_answer(client: TestClient, own_roots: Settings) -> None:
    answer = client.get("/v1/ready")
    assert answer.status_code == 200
    assert answer.json()["ready"] is True
    missing = TestClient(
        create_app(own_roots.model_copy(update={"stores_root": own_roots.stores_root / "gone"}))
    )
    answer = missing.get("/v1/ready")
    assert answer.status_code == 503
    assert answer.json()["checks"]["stores"]["ok"] is False
    assert answer.json()["checks"]["queue"]["ok"] is True


def test_a_scheduler_found_through_a_link_out_of_the_models_root_is_refused_at_create_and_reopen(
    own_roots: Settings, tiny_run, tmp_path
) -> None:
    """The run's `scheduler/` (found, never named by the client) as a link to the same files outside the
    models root: a 422 at create; linked inside the root it is used, and the index made so is refused
    by a process that reopens it once the link leads out."""
    scheduler = own_roots.models_root / "run" / "scheduler"
    spec = index_spec().model_copy(update={"slots": SlotSpec(replay=False, grid=1)})
    shutil.rmtree(scheduler)
    scheduler.symlink_to(tiny_run.folder / "scheduler", target_is_directory=True)
    message = "the scheduler 'scheduler' leads outside the configured root through a link"
    assert_create_refused(own_roots, "linked", spec.model_dump(mode="json"), message)
    inside = shutil.copytree(tiny_run.folder / "scheduler", own_roots.models_root / "shared-scheduler")
    scheduler.unlink()
    scheduler.symlink_to(inside, target_is_directory=True)  # a link that stays inside: used
    StoreRepository(own_roots).create(IndexCreate(name="linked", spec=spec))
    scheduler.unlink()
    scheduler.symlink_to(tiny_run.folder / "scheduler", target_is_directory=True)  # turned outward later
    answer = TestClient(create_app(own_roots)).get("/v1/indexes/linked")  # a fresh process opens it
    assert answer.status_code == 409, answer.text
    assert message in answer.json()["detail"], answer.text
    assert str(tiny_run.folder) not in answer.text


def test_a_link_out_of_the_data_root_is_refused_at_create_and_at_read(own_roots: Settings, tmp_path) -> None:
    """A link in an image folder pointing outside the data root: never indexed, never served."""
    folder = own_roots.data_root / f"linked-{tmp_path.name}"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(outside)
    spec = IndexSpec(
        dataset=DatasetSpec(source=folder.name, resolution=8),
        checkpoints=(CheckpointSpec(path="run/checkpoints/epoch-0002"),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=1),
        projector=ProjectorSpec(kind="sketch", dim=64, seed=3),
    )
    repository = StoreRepository(own_roots)
    (folder / "3.png").symlink_to(outside)
    with pytest.raises(SpecError, match="leaves the configured root"):
        repository.create(IndexCreate(name="x", spec=spec))
    (folder / "3.png").unlink()
    repository.create(IndexCreate(name="x", spec=spec))
    client = TestClient(create_app(own_roots))
    assert client.get("/v1/indexes/x/samples/0.png").status_code == 200
    (folder / "3.png").symlink_to(outside)  # added after the index was made
    assert client.get("/v1/indexes/x/samples/3.png").status_code == 404  # not in the opened index
    answer = TestClient(create_app(own_roots)).get("/v1/indexes/x/samples/3.png")  # a fresh open
    assert answer.status_code == 409
    assert "leaves the configured root" in answer.json()["detail"]
    assert "secret" not in answer.text
    assert str(tmp_path) not in answer.text


def test_an_index_has_one_name_whichever_way_it_was_made(own_roots: Settings) -> None:
    """`retrac index create stores/cli.zarr` and `POST /v1/indexes {"name": "api"}` make indexes
    `cli` and `api`: listed, described, created over and deleted by those names."""
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})
    spec = own_roots.stores_root.parent / "spec.json"
    spec.write_text(StoreRepository(own_roots).confine(index_spec()).model_dump_json())
    stores = own_roots.stores_root
    assert main(["index", "create", str(stores / "cli.zarr"), "--spec", str(spec),
                 "--models-root", str(own_roots.models_root)]) == 0
    StoreRepository(own_roots).create(IndexCreate(name="api", spec=index_spec()))
    assert [i["name"] for i in client.get("/v1/indexes").json()["data"]] == ["api", "cli"]
    assert client.get("/v1/indexes/cli").json()["name"] == "cli"
    taken = client.post("/v1/indexes", json={"name": "cli", "spec": index_spec().model_dump(mode="json")})
    assert taken.status_code == 409, taken.text
    assert client.delete("/v1/indexes/cli").status_code == 204
    assert sorted(p.name for p in stores.iterdir()) == ["api"]
    assert main(["index", "create", str(stores / "api.zarr"), "--spec", str(spec),
                 "--models-root", str(own_roots.models_root)]) == 0
    listed = client.get("/v1/indexes").json()  # two folders for one name: the hidden one is said
    assert [i["name"] for i in listed["data"]] == ["api"]
    assert [b["name"] for b in listed["broken"]] == ["api.zarr"]
    assert "hidden by the index of the same name" in listed["broken"][0]["reason"]
