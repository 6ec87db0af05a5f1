"""Approximate search over HTTP: the answer says which search made it, and an index without an ANN
index is refused with a 409 that says how to build one."""

from __future__ import annotations

import base64
from pathlib import Path

from fastapi.testclient import TestClient

from api_schemas.attribution import AttributionsPublic
from retrac.attribution import Attributor
from service.settings import Settings
from tests.service.conftest import INDEX, QUERY
from tests.service.test_attribute import assert_matches, digit_pixels, expected, png


def body(reference: Attributor, search: str) -> dict:
    image = base64.b64encode(png(digit_pixels(reference, 11))).decode()
    return {**QUERY, "search": search, "images": [{"base64": image}]}


def test_approximate_search_answers_and_says_so(client: TestClient, reference: Attributor) -> None:
    response = client.post(f"/v1/indexes/{INDEX}/attribute", json=body(reference, "approximate"))
    assert response.status_code == 200, response.text
    answer = AttributionsPublic.model_validate(response.json())
    assert answer.search == "approximate"
    assert_matches(answer, expected(reference, [digit_pixels(reference, 11)]))  # 48 rows: all are candidates
    exact = client.post(f"/v1/indexes/{INDEX}/attribute", json=body(reference, "exact"))
    assert exact.json()["search"] == "exact"


def test_an_index_without_an_ann_index_is_refused_with_how_to_build_it(
    client: TestClient, reference: Attributor, settings: Settings
) -> None:
    folder = Path(settings.stores_root) / INDEX / "ann"
    aside = folder.with_name("ann-aside")
    folder.rename(aside)
    try:
        response = client.post(f"/v1/indexes/{INDEX}/attribute", json=body(reference, "approximate"))
    finally:
        aside.rename(folder)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "has no ANN index" in detail
    assert "retrac index ann" in detail
    assert "\n" not in detail


def test_an_unknown_search_is_a_422_naming_the_choices(client: TestClient, reference: Attributor) -> None:
    response = client.post(f"/v1/indexes/{INDEX}/attribute", json=body(reference, "fuzzy"))
    assert response.status_code == 422
    assert "search" in response.json()["detail"]
    assert "approximate" in response.json()["detail"]
