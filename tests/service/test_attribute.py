"""Attribution over HTTP equals the engine's in-memory computation, in every request form."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from api_schemas import QuerySpec
from api_schemas.attribution import AttributionPublic, AttributionsPublic
from retrac.attribution import Attributor
from tests.service.conftest import INDEX, QUERY

SCORE_TOLERANCE = 1e-4
"""Relative: the service's query and the reference run the same float32 arithmetic, batched differently."""


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def digit_pixels(reference: Attributor, row: int) -> np.ndarray:
    """Training sample `row` as uint8: decoding it again gives exactly its tensor."""
    return reference.plan.dataset.to_uint8(row)


def expected(
    reference: Attributor, pixels: list[np.ndarray], top_k: int = QUERY["top_k"], **kwargs
) -> list[AttributionPublic]:
    images = torch.stack([torch.from_numpy(p).float().div(255).mul(2).sub(1)[None] for p in pixels])
    spec = QuerySpec(timesteps=QUERY["timesteps"], draws=QUERY["draws"], seed=QUERY["seed"])
    return reference.attribute(images, spec, top_k=top_k, **kwargs)


def assert_matches(answer: AttributionsPublic, results: list[AttributionPublic]) -> None:
    assert answer.count == len(results) == len(answer.data)
    for got, want in zip(answer.data, results, strict=True):
        assert set(got.methods) == set(want.methods)
        for method, ranking in got.methods.items():
            for kind in ("proponents", "opponents"):
                ours, theirs = getattr(ranking, kind), getattr(want.methods[method], kind)
                assert [i.sample_id for i in ours] == [i.sample_id for i in theirs], (method, kind)
                assert [i.rank for i in ours] == list(range(1, len(theirs) + 1))
                for a, b in zip(ours, theirs, strict=True):
                    assert a.score == pytest.approx(b.score, rel=SCORE_TOLERANCE, abs=1e-9)
                    assert a.contributions == pytest.approx(
                        b.contributions, rel=SCORE_TOLERANCE, abs=1e-9
                    )
                    assert sum(a.contributions) == pytest.approx(a.score, rel=1e-5, abs=1e-9)
                    assert a.timesteps == b.timesteps


def test_upload_png_matches_engine(client: TestClient, reference: Attributor) -> None:
    pixels = digit_pixels(reference, 3)
    response = client.post(
        f"/v1/indexes/{INDEX}/attribute/upload",
        files={"images": ("q.png", png(pixels), "image/png")},
        data=QUERY,
    )
    assert response.status_code == 200, response.text
    answer = AttributionsPublic.model_validate(response.json())
    assert_matches(answer, expected(reference, [pixels]))
    assert answer.checkpoints == [0, 1, 2]
    assert answer.timesteps == QUERY["timesteps"]
    assert answer.dtype == "float32"  # the stored precision scored (the index is float32)
    assert answer.timings.gradient_s > 0
    assert answer.timings.scan_s > 0
    assert answer.timings.wait_s >= 0
    assert answer.timings.total_s >= answer.timings.wait_s + answer.timings.gradient_s + answer.timings.scan_s
    assert answer.notices == []  # a grey 8 px PNG is taken as it is


def test_the_answer_says_what_decoding_the_queries_converted(
    client: TestClient, reference: Attributor
) -> None:
    grey = digit_pixels(reference, 3)
    rgb = np.repeat(np.repeat(np.stack([grey] * 3, axis=-1), 2, axis=0), 2, axis=1)  # 16x16 RGB
    files = [("images", ("a.png", png(rgb), "image/png")), ("images", ("b.png", png(grey), "image/png"))]
    response = client.post(f"/v1/indexes/{INDEX}/attribute/upload", files=files, data=QUERY)
    assert response.status_code == 200, response.text
    assert response.json()["notices"] == [
        "query images: 1 of 2 converted from RGB to grey (ITU-R BT.601 luma)",
        "query images: 1 of 2 resized from 16x16 to 8x8 px (bilinear)",
    ]


def test_several_images_share_one_request(client: TestClient, reference: Attributor) -> None:
    pixels = [digit_pixels(reference, row) for row in (0, 11, 25)]
    files = [("images", (f"q{i}.png", png(p), "image/png")) for i, p in enumerate(pixels)]
    response = client.post(f"/v1/indexes/{INDEX}/attribute/upload", files=files, data=QUERY)
    assert response.status_code == 200, response.text
    assert_matches(AttributionsPublic.model_validate(response.json()), expected(reference, pixels))


def test_json_base64_npy_and_nested_array(client: TestClient, reference: Attributor) -> None:
    first, second = digit_pixels(reference, 5), digit_pixels(reference, 9)
    packed = io.BytesIO()
    np.save(packed, first)
    body = {
        **QUERY,
        "images": [
            {"base64": base64.b64encode(packed.getvalue()).decode()},
            {"array": (second / 255.0).tolist()},
        ],
    }
    response = client.post(f"/v1/indexes/{INDEX}/attribute", json=body)
    assert response.status_code == 200, response.text
    assert_matches(AttributionsPublic.model_validate(response.json()), expected(reference, [first, second]))


def test_one_method_and_a_checkpoint_subset(client: TestClient, reference: Attributor) -> None:
    pixels = digit_pixels(reference, 17)
    body = {
        **QUERY,
        "methods": ["retrac"],
        "checkpoints": [0, 2],
        "images": [{"base64": base64.b64encode(png(pixels)).decode()}],
    }
    response = client.post(f"/v1/indexes/{INDEX}/attribute", json=body)
    assert response.status_code == 200, response.text
    answer = AttributionsPublic.model_validate(response.json())
    assert answer.checkpoints == [0, 2]
    assert_matches(answer, expected(reference, [pixels], methods=["retrac"], checkpoints=[0, 2]))
    assert all(len(i.contributions) == 2 for i in answer.data[0].methods["retrac"].proponents)
