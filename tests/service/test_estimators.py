"""The estimator over HTTP: the matched estimator on an index with shared-noise slots, its answer
naming the estimator and the settings it ran with, and refusals of what an index cannot answer."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from api_schemas import IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from api_schemas.attribution import AttributionsPublic
from api_schemas.indexes import IndexCreate
from retrac.attribution import Attributor
from retrac.computers import GradientComputerCache
from retrac.plan import IndexPlan
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from storage import run_pending
from tests.conftest import TINY_DATASET
from tests.service.conftest import API_KEY

SHARED = "digits-shared"
PAPER = "digits-replay"
SLOTS = SlotSpec(replay=True, grid=3, noise="shared", draws=2, seed=5)
SCORE_TOLERANCE = 1e-4
"""Relative: the service's query and the reference run the same float32 arithmetic, batched differently."""


def shared_spec() -> IndexSpec:
    return IndexSpec(
        dataset=TINY_DATASET, run="run", slots=SLOTS,
        projector=ProjectorSpec(kind="sketch", dim=256, seed=3), dtype="float32", shard_size=16,
    )


@pytest.fixture(scope="module")
def own_settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The session's settings with a stores root of this module, holding a shared-noise index and an
    index of the replayed step alone."""
    own = settings.model_copy(update={"stores_root": tmp_path_factory.mktemp("estimator-stores")})
    repository, computers = StoreRepository(own), GradientComputerCache("cpu", threads=1)
    run_pending(repository.create(IndexCreate(name=SHARED, spec=shared_spec())), computers)
    replay_only = shared_spec().model_copy(update={"slots": SlotSpec(replay=True)})
    run_pending(repository.create(IndexCreate(name=PAPER, spec=replay_only)), computers)
    return own


@pytest.fixture(scope="module")
def shared_client(own_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(own_settings), headers={"X-API-Key": API_KEY}) as session:
        yield session


def npy(pixels: np.ndarray) -> dict[str, str]:
    out = io.BytesIO()
    np.save(out, pixels)
    return {"base64": base64.b64encode(out.getvalue()).decode()}


def test_matched_answer_equals_the_engine_and_names_its_estimator(shared_client, own_settings) -> None:
    plan = IndexPlan.resolve(StoreRepository(own_settings).confine(shared_spec()))
    reference = Attributor(plan)
    pixels = plan.dataset.to_uint8(2)
    response = shared_client.post(
        f"/v1/indexes/{SHARED}/attribute", json={"images": [npy(pixels)], "estimator": "matched", "top_k": 3}
    )
    assert response.status_code == 200, response.text
    answer = AttributionsPublic.model_validate(response.json())
    assert (answer.estimator, answer.timesteps, answer.draws, answer.seed) == ("matched", 3, 2, 5)
    image = torch.from_numpy(pixels).float().div(255).mul(2).sub(1)[None, None]  # as the service decodes it
    want = reference.attribute(image, QuerySpec(estimator="matched"), top_k=3)[0]
    got = answer.data[0]
    assert got.estimator == want.estimator == "matched"
    for method, ranking in got.methods.items():
        assert [i.sample_id for i in ranking.proponents] == [
            i.sample_id for i in want.methods[method].proponents
        ]
        for a, b in zip(ranking.proponents, want.methods[method].proponents, strict=True):
            assert a.score == pytest.approx(b.score, rel=SCORE_TOLERANCE)
            assert [a.bands.coarse, a.bands.middle, a.bands.fine] == pytest.approx(
                [b.bands.coarse, b.bands.middle, b.bands.fine], rel=SCORE_TOLERANCE, abs=1e-6 * abs(b.score)
            )
    # the query image is training sample 2: under matched ReTrac it ranks itself first
    assert got.methods["retrac"].proponents[0].sample_id == plan.dataset.ids[2]


def test_matched_through_the_upload_form(shared_client) -> None:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    out = io.BytesIO()
    np.save(out, pixels)
    response = shared_client.post(
        f"/v1/indexes/{SHARED}/attribute/upload",
        files={"images": ("q.npy", out.getvalue())}, data={"estimator": "matched", "top_k": "2"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["estimator"] == "matched"
    assert response.json()["timesteps"] == 3


@pytest.mark.parametrize(
    ("index", "body", "message"),
    [
        (PAPER, {"estimator": "matched"}, "needs an index with shared-noise grid slots"),
        (
            SHARED,
            {"estimator": "matched", "draws": 4},
            "shared slots (timesteps=3, draws=2, seed=5); got draws=4",
        ),
        (SHARED, {"estimator": "exact"}, "estimator"),
    ],
)
def test_estimators_an_index_cannot_answer_are_4xx_with_one_line(shared_client, index, body, message) -> None:
    response = shared_client.post(
        f"/v1/indexes/{index}/attribute", json={"images": [npy(np.zeros((8, 8), dtype=np.uint8))], **body}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert message in (detail if isinstance(detail, str) else str(detail))
