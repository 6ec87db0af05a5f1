"""Sample images and diagnostics, checked against the dataset and the engine's own computations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from scipy import stats

from api_schemas.diagnostics import NormTimestepPublic, SelfInfluencePublic
from retrac.attribution import Attributor
from retrac.scoring import self_influence
from tests.service.conftest import INDEX


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
    assert image.format == "PNG" and image.size == (600, 400)


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_self_influence_ranking_matches_engine(
    client: TestClient, reference: Attributor, method: str
) -> None:
    response = client.get(
        f"/v1/indexes/{INDEX}/diagnostics/self-influence", params={"method": method, "limit": 10}
    )
    assert response.status_code == 200, response.text
    ranking = SelfInfluencePublic.model_validate(response.json())
    # Engine: replayed slot 0 as the training side, grid slots 1-2 as the query side, all checkpoints.
    scores = self_influence(reference.rows, reference.plan.weights, [0], [1, 2])[method]
    order = torch.argsort(scores, descending=True, stable=True)[:10]
    assert [e.sample_id for e in ranking.data] == [reference.plan.dataset.ids[i] for i in order]
    assert [e.score for e in ranking.data] == pytest.approx(scores[order].tolist(), rel=1e-5)
    assert (ranking.count, ranking.total) == (10, 48)
