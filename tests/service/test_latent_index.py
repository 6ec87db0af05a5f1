"""A latent pipeline over HTTP (the ASGI app): refused at POST /v1/indexes when its dataset does not
fit the VAE, created (its job queued on the real Redis, filled here by the embedded runner), queried
with uploaded files against the brute force, its samples served as the images, not their latents."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrac.computers import GradientComputerCache
from service.main import create_app
from service.settings import Settings
from storage import GradientStore, run_pending
from tests.retrac.latent_pipeline import (
    DATA,
    IMAGE_SIDE,
    latent_index_spec,
    relative_error,
    save_latent_pipeline,
    score_table,
)
from tests.service.conftest import API_KEY
from tests.storage.test_latent_store import RELATIVE_ERROR, SEED, K, M, expected_scores, query_files

NAME = "latent"


@pytest.mark.redis
def test_a_latent_pipeline_over_http(own_roots: Settings, tmp_path: Path) -> None:
    pipeline = save_latent_pipeline(own_roots.models_root / "pipeline")
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})
    spec = latent_index_spec("pipeline")  # relative to the models root

    small = spec.model_copy(update={"dataset": DATA.model_copy(update={"resolution": 8})})
    refused = client.post("/v1/indexes", json={"name": NAME, "spec": small.model_dump(mode="json")})
    assert 400 <= refused.status_code < 500, refused.text
    assert "takes 3x16x16" in refused.json()["detail"], refused.text
    assert not (own_roots.stores_root / NAME).exists()

    created = client.post("/v1/indexes", json={"name": NAME, "spec": spec.model_dump(mode="json")})
    assert created.status_code == 202, created.text
    assert (created.json()["resolution"], created.json()["channels"]) == (IMAGE_SIDE, 3)
    try:
        store = GradientStore.open(own_roots.stores_root / NAME)
        run_pending(store, GradientComputerCache("cpu", threads=1))
        files, queries = query_files(tmp_path)
        uploads = [("images", (f.name, f.read_bytes(), "application/octet-stream")) for f in files]
        knobs = {"timesteps": K, "draws": M, "seed": SEED, "top_k": store.num_rows}
        answered = client.post(f"/v1/indexes/{NAME}/attribute/upload", data=knobs, files=uploads)
        assert answered.status_code == 200, answered.text
        expected = expected_scores(pipeline, store, queries)
        for method in ("tracin", "retrac"):
            got = score_table(answered.json()["data"], store.sample_ids, method)
            assert relative_error(got, expected[method]) < RELATIVE_ERROR

        generated = client.post(f"/v1/indexes/{NAME}/generate", json={"steps": 2})
        assert generated.status_code == 422, generated.text
        assert "latent model" in generated.json()["detail"], generated.text

        sample = client.get(f"/v1/indexes/{NAME}/samples/{store.sample_ids[0]}")
        assert sample.status_code == 200
        assert Image.open(io.BytesIO(sample.content)).mode == "RGB"  # the image, not its 4-channel latent
    finally:
        assert client.delete(f"/v1/indexes/{NAME}").status_code == 204
        shutil.rmtree(pipeline)
