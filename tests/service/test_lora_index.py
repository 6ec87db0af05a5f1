"""LoRA adapters and parameter subsets over HTTP: `POST /v1/indexes` refuses what `index create` refuses
(a 422 in one line, nothing written), and an index of adapters lists what its gradients are over."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, SlotSpec
from api_schemas.indexes import IndexCreate
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from tests.retrac.lora_models import save_base, save_peft_adapter
from tests.service.conftest import API_KEY, assert_create_refused

DATA = {"source": "builtin:digits", "resolution": 8, "limit": 4}


@pytest.fixture
def roots(tmp_path: Path) -> Settings:
    base = save_base(tmp_path / "models" / "base")
    save_peft_adapter(tmp_path / "models" / "adapter", base)
    save_peft_adapter(tmp_path / "models" / "dora", base, use_dora=True)
    (tmp_path / "stores").mkdir()
    return Settings(stores_root=tmp_path / "stores", models_root=tmp_path / "models", api_key=API_KEY)


def spec(checkpoint: str, **fields: object) -> dict:
    return {"dataset": DATA, "checkpoints": [{"path": checkpoint, "weight": 1}], "loss": "mse",
            "slots": {"replay": False, "grid": 1}, "projector": {"dim": 64}, **fields}


@pytest.mark.redis
@pytest.mark.parametrize(("fields", "message"), [
    (spec("adapter"), "a LoRA adapter, not a diffusers model folder (no config.json); index it with"),
    (spec("dora", base="base"), "a DoRA adapter (use_dora) is not handled"),
    (spec("base", parameters=["*to_kk*"]), "'*to_kk*' matches no trainable parameter of the model; closest"),
])
def test_create_refuses_in_one_line(roots: Settings, fields: dict, message: str) -> None:
    assert_create_refused(roots, "refused", fields, message)


def test_an_index_of_adapters_lists_its_parameters(roots: Settings) -> None:
    index = IndexSpec(
        dataset=DatasetSpec(**DATA), checkpoints=(CheckpointSpec(path="adapter", weight=1),), base="base",
        loss="mse", slots=SlotSpec(replay=False, grid=1),
    )
    StoreRepository(roots).create(IndexCreate(name="lora", spec=index))
    with TestClient(create_app(roots), headers={"X-API-Key": API_KEY}) as session:
        listed = session.get("/v1/indexes").json()["data"]
    parameters = next(i for i in listed if i["name"] == "lora")["parameters"]
    assert parameters["count"] > 0
    assert parameters["patterns"] == []
    assert (parameters["adapters"][0]["format"], parameters["adapters"][0]["r"]) == ("peft", 2)
