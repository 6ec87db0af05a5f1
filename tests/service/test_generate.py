"""POST /generate samples from the process's cached model: loaded once, and what a fresh load samples."""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from retrac.attribution import Attributor
from retrac.datasets import ImageDataset
from retrac.evaluation.sampling import generate_for_index
from retrac.plan import IndexPlan
from tests.service.conftest import INDEX

BODY = {"count": 2, "sampler": "ddim", "steps": 3, "seed": 5}
PIXEL_TOLERANCE = 1
"""uint8 levels: the service may sample with another CPU thread count than this test, which reorders
float32 sums and can move a pixel across a rounding boundary."""


def pixels(answer: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(g["png_base64"])))) for g in answer["data"]]


def test_generation_loads_the_model_once_and_samples_what_a_fresh_load_does(
    client: TestClient, reference: Attributor, monkeypatch
) -> None:
    loads: list[int] = []
    load = IndexPlan.load_model

    def counted(plan: IndexPlan, checkpoint: int, *args, **kwargs):
        loads.append(checkpoint)
        return load(plan, checkpoint, *args, **kwargs)

    monkeypatch.setattr(IndexPlan, "load_model", counted)
    url = f"/v1/indexes/{INDEX}/generate"
    answers = [client.post(url, json=BODY) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    assert len(loads) <= 1, f"checkpoints loaded {loads}: the cached model should serve every request"
    first, *others = (pixels(a.json()) for a in answers)
    assert all(np.array_equal(a, b) for other in others for a, b in zip(first, other, strict=True))

    monkeypatch.setattr(IndexPlan, "load_model", load)
    fresh = generate_for_index(reference.plan, BODY["count"], steps=BODY["steps"], seed=BODY["seed"])
    images = ImageDataset(fresh.images, ("0", "1"), "generated")
    for i, served in enumerate(first):
        assert np.abs(served.astype(int) - images.to_uint8(i).astype(int)).max() <= PIXEL_TOLERANCE
