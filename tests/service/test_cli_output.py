"""One output shape: `retrac attribute --json` is the HTTP answer's model, equal to the service's answer
for the same query; validation messages over HTTP carry no library prefix."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api_schemas.attribution import AttributionsPublic
from cli import main
from service.settings import Settings
from tests.service.conftest import INDEX, QUERY
from tests.service.test_attribute import SCORE_TOLERANCE, digit_pixels


def test_cli_json_is_the_http_answer(
    client: TestClient, settings: Settings, reference, tmp_path, capsys
) -> None:
    query = tmp_path / "q.png"
    Image.fromarray(digit_pixels(reference, 3)).save(query)
    knobs = {key: str(value) for key, value in QUERY.items()}
    assert main(["attribute", str(settings.stores_root / INDEX), str(query), "--json",
                 *[part for key, value in knobs.items()
                   for part in (f"--{key.replace('_', '-')}", value)]]) == 0
    cli = AttributionsPublic.model_validate(json.loads(capsys.readouterr().out))
    response = client.post(f"/v1/indexes/{INDEX}/attribute/upload",
                           files={"images": ("q.png", query.read_bytes(), "image/png")}, data=QUERY)
    assert response.status_code == 200, response.text
    http = AttributionsPublic.model_validate(response.json())
    settings_of = {"timings", "data"}
    assert cli.model_dump(exclude=settings_of) == http.model_dump(exclude=settings_of)  # index name included
    assert cli.data[0].image == str(query)
    assert http.data[0].image == "q.png"
    for ours, theirs in zip(cli.data[0].methods.values(), http.data[0].methods.values(), strict=True):
        for side in ("proponents", "opponents"):
            for a, b in zip(getattr(ours, side), getattr(theirs, side), strict=True):
                assert (a.sample_id, a.rank, a.timesteps) == (b.sample_id, b.rank, b.timesteps)
                assert a.score == pytest.approx(b.score, rel=SCORE_TOLERANCE, abs=1e-9)
                assert a.contributions == pytest.approx(b.contributions, rel=SCORE_TOLERANCE, abs=1e-9)


def test_http_validation_messages_name_the_fields_without_a_prefix(client: TestClient) -> None:
    spec = {"dataset": {"source": "builtin:digits"}, "run": "run", "slots": {"noise": "shared"}}
    response = client.post("/v1/indexes", json={"name": "shared-nogrid", "spec": spec})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "invalid request: body.spec.slots.noise, body.spec.slots.grid: shared slot noise applies to grid "
        "slots; give grid > 0"
    )


def test_a_non_image_upload_says_what_to_send(client: TestClient) -> None:
    response = client.post(f"/v1/indexes/{INDEX}/attribute/upload",
                           files={"images": ("notes.txt", io.BytesIO(b"hello, I am text"), "text/plain")},
                           data=QUERY)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "notes.txt is not a readable image: its bytes are no PNG, JPEG, BMP, WEBP, GIF or TIFF file, "
        "nor a .npy array"
    )
