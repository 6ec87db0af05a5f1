"""Sample images and diagnostics, checked against the dataset and the engine's own computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy import stats

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec
from api_schemas.diagnostics import NormTimestepPublic, SelfInfluencePublic
from api_schemas.indexes import IndexCreate
from retrac.attribution import Attributor
from retrac.evaluation.outliers import OUTLIER_SCORES, outlier_scores
from retrac.scoring import self_influence_slots
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from tests.service.conftest import API_KEY, INDEX


def decode(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_sample_image_is_the_training_pixels(client: TestClient, reference: Attributor) -> None:
    dataset = reference.plan.dataset
    row = 7
    pixels = decode(client.get(f"/v1/indexes/{INDEX}/samples/{dataset.ids[row]}"))
    assert np.array_equal(pixels, dataset.to_uint8(row))


def test_thumbnail_enlarges_by_whole_pixels(client: TestClient, reference: Attributor) -> None:
    dataset = reference.plan.dataset
    pixels = decode(client.get(f"/v1/indexes/{INDEX}/samples/{dataset.ids[2]}", params={"size": 64}))
    assert pixels.shape == (64, 64)
    assert np.array_equal(pixels[::8, ::8], dataset.to_uint8(2))


def test_norm_statistics_match_the_rows(client: TestClient, reference: Attributor) -> None:
    response = client.get(f"/v1/indexes/{INDEX}/diagnostics/norms", params={"checkpoint": 1, "bins": 4})
    assert response.status_code == 200, response.text
    stats_public = NormTimestepPublic.model_validate(response.json())
    rows = reference.rows[1]
    t, n = rows.timesteps.reshape(-1).double().numpy(), rows.norms.reshape(-1).double().numpy()
    assert stats_public.count == t.size == 48 * 3
    assert stats_public.pearson == pytest.approx(stats.pearsonr(t, n).statistic, abs=1e-6)
    assert stats_public.spearman == pytest.approx(stats.spearmanr(t, n).statistic, abs=1e-6)
    num_timesteps = reference.plan.num_timesteps
    per_schedule = np.polyfit(t / num_timesteps, n, 1)[0]  # the slope per unit t/T
    assert stats_public.slope == pytest.approx(per_schedule, rel=1e-5)
    assert sum(b.count for b in stats_public.bins) == t.size
    first = stats_public.bins[0]
    inside = n[(t >= first.t_start) & (t < first.t_stop)]
    assert first.mean == pytest.approx(inside.mean(), rel=1e-5)


def test_norm_plot_is_a_png(client: TestClient) -> None:
    response = client.get(f"/v1/indexes/{INDEX}/diagnostics/norms.png")
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    assert image.size == (600, 400)


@pytest.mark.parametrize("score", OUTLIER_SCORES)
def test_each_outlier_ranking_is_served_as_the_engine_computes_it(
    client: TestClient, reference: Attributor, score: str
) -> None:
    response = client.get(
        f"/v1/indexes/{INDEX}/diagnostics/self-influence", params={"method": score, "limit": 10}
    )
    assert response.status_code == 200, response.text
    ranking = SelfInfluencePublic.model_validate(response.json())
    # Engine, rows in memory: self-influence of replayed slot 0 against grid slots 1-2, all checkpoints.
    assert self_influence_slots(reference.plan.spec.slots.kinds) == ([0], [1, 2])
    expected = outlier_scores(reference.rows, reference.plan.weights, reference.plan.spec.slots.kinds)[score]
    order = np.argsort(-expected, kind="stable")[:10]
    assert ranking.method == score
    assert [e.sample_id for e in ranking.data] == [reference.plan.dataset.ids[i] for i in order]
    assert [e.score for e in ranking.data] == pytest.approx(expected[order].tolist(), rel=1e-5)
    assert (ranking.count, ranking.total) == (10, 48)


def test_folder_sample_ids_keep_their_path_and_are_served(own_roots: Settings, tmp_path) -> None:
    folder = own_roots.data_root / f"classes-{tmp_path.name}"
    for group, value in (("cats", 30), ("dogs", 200)):
        (folder / group).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(folder / group / f"{i}.png")
    spec = IndexSpec(
        dataset=DatasetSpec(source=folder.name, resolution=8),
        checkpoints=(CheckpointSpec(path="run/checkpoints/epoch-0002"),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=1),
        projector=ProjectorSpec(kind="sketch", dim=64, seed=3),
    )
    store = StoreRepository(own_roots).create(IndexCreate(name="classes", spec=spec))
    assert store.sample_ids == ("cats/0.png", "cats/1.png", "dogs/0.png", "dogs/1.png")
    client = TestClient(create_app(own_roots), headers={"X-API-Key": API_KEY})
    for url in ("/v1/indexes/classes/samples/dogs/1.png", "/v1/indexes/classes/samples/dogs%2F1.png"):
        assert np.array_equal(decode(client.get(url)), np.full((8, 8), 201, np.uint8))
    for unknown in ("dogs/7.png", "dogs", "dogs/1.png/x", "1.png"):
        answer = client.get(f"/v1/indexes/classes/samples/{unknown}")
        assert answer.status_code == 404, unknown
        assert "no sample" in answer.json()["detail"], unknown
    for outside in ("cats/%2E%2E/dogs/1.png", "%2Fetc/passwd", "cats//0.png"):
        answer = client.get(f"/v1/indexes/classes/samples/{outside}")
        assert answer.status_code in (404, 422), outside
        assert "Traceback" not in answer.text, outside
