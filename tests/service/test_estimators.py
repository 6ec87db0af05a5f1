"""The estimator over HTTP: the matched estimator on an index with shared-noise slots, its answer
naming the estimator and the settings it ran with, the defaults a request that names no estimator or
method gets (the measured best the index serves), and refusals of what an index cannot answer."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from api_schemas import IndexSpec, KernelSpec, ProjectorSpec, QuerySpec, SlotSpec
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
KERNEL = "digits-kernel"
PAPER = "digits-replay"
SLOTS = SlotSpec(replay=True, grid=3, noise="shared", draws=2, seed=5)
SCORE_TOLERANCE = 1e-4
"""Relative: the service's query and the reference run the same float32 arithmetic, batched differently."""


def shared_spec() -> IndexSpec:
    return IndexSpec(
        dataset=TINY_DATASET, run="run", slots=SLOTS,
        projector=ProjectorSpec(kind="sketch", dim=256, seed=3), dtype="float32", shard_size=16,
    )


def kernel_spec() -> IndexSpec:
    return shared_spec().model_copy(update={"kernel": KernelSpec()})


@pytest.fixture(scope="module")
def own_settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The session's settings with a stores root of this module, holding a shared-noise index and an
    index of the replayed step alone."""
    own = settings.model_copy(update={"stores_root": tmp_path_factory.mktemp("estimator-stores")})
    repository, computers = StoreRepository(own), GradientComputerCache("cpu", threads=1)
    run_pending(repository.create(IndexCreate(name=SHARED, spec=shared_spec())), computers)
    replay_only = shared_spec().model_copy(update={"slots": SlotSpec(replay=True)})
    run_pending(repository.create(IndexCreate(name=PAPER, spec=replay_only)), computers)
    run_pending(repository.create(IndexCreate(name=KERNEL, spec=kernel_spec())), computers)
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


def test_a_request_naming_nothing_gets_trak_matched_where_the_index_serves_it(
    shared_client, own_settings
) -> None:
    plan = IndexPlan.resolve(StoreRepository(own_settings).confine(kernel_spec()))
    pixels = plan.dataset.to_uint8(4)
    url = f"/v1/indexes/{KERNEL}/attribute"
    response = shared_client.post(url, json={"images": [npy(pixels)], "top_k": 3})
    assert response.status_code == 200, response.text
    answer = AttributionsPublic.model_validate(response.json())
    assert (answer.estimator, list(answer.data[0].methods)) == ("matched", ["trak"])
    assert answer.notices == []
    image = torch.from_numpy(pixels).float().div(255).mul(2).sub(1)[None, None]
    want = Attributor(plan).attribute(image, QuerySpec(estimator="matched"), methods=["trak"], top_k=3)[0]
    got = answer.data[0].methods["trak"].proponents
    assert [i.sample_id for i in got] == [i.sample_id for i in want.methods["trak"].proponents]
    assert [i.score for i in got] == pytest.approx(
        [i.score for i in want.methods["trak"].proponents], rel=SCORE_TOLERANCE
    )
    nulls = shared_client.post(
        url, json={"images": [npy(pixels)], "top_k": 3, "estimator": None, "methods": None}
    )
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["data"] == response.json()["data"]


@pytest.mark.parametrize(
    ("index", "knobs", "estimator", "methods", "notice"),
    [
        (SHARED, {}, "matched", ["retrac"], "the best this index serves (method trak needs the index's TRAK"),
        (PAPER, {"timesteps": 4, "draws": 2}, "paper", ["tracin", "retrac"], None),  # its own K: paper
    ],
)
def test_defaults_fall_back_to_what_the_index_serves_and_say_so(
    shared_client, index, knobs, estimator, methods, notice
) -> None:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    url = f"/v1/indexes/{index}/attribute"
    response = shared_client.post(url, json={"images": [npy(pixels)], "top_k": 2, **knobs})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["estimator"], list(answer["data"][0]["methods"])) == (estimator, methods)
    assert any(notice in n for n in answer["notices"]) if notice else answer["notices"] == []


@pytest.mark.parametrize("form", [False, True])
def test_a_method_the_index_cannot_serve_is_a_422_naming_the_flag(shared_client, form) -> None:
    out = io.BytesIO()
    np.save(out, np.zeros((8, 8), dtype=np.uint8))
    url = f"/v1/indexes/{SHARED}/attribute"
    if form:
        response = shared_client.post(
            f"{url}/upload", files={"images": ("q.npy", out.getvalue())}, data={"methods": ["trak"]}
        )
    else:
        response = shared_client.post(url, json={"images": [npy(np.zeros((8, 8), dtype=np.uint8))],
                                                 "methods": ["retrac", "trak"]})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail == (
        "method trak needs the index's TRAK kernel and this index has none: create it with --kernel"
    )
