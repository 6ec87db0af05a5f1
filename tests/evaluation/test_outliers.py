"""Outlier scores on planted mixtures: the relative-norm score and per-group AUC against loops and
scikit-learn, the mixtures' make-up, and one detection run end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from api_schemas import KernelSpec, ProjectorSpec
from retrac.evaluation import metrics
from retrac.evaluation.outliers import (
    OUTLIER,
    OUTLIER_SCORES,
    OutlierConfig,
    atypical_directions,
    detect_outliers,
    kernel_self_influence,
    planted_mix,
    relative_norms,
)
from retrac.exceptions import SpecError
from retrac.kernels import build_kernel
from retrac.scoring import RowChunk

torch.set_num_threads(1)


def test_relative_norms_match_a_loop_over_checkpoints_samples_and_slots() -> None:
    rng = np.random.default_rng(0)
    norms = [torch.tensor(rng.uniform(0.1, 5.0, size=(5, 3)), dtype=torch.float32) for _ in range(2)]
    norms[1][2, 1] = 0.0  # a zero gradient stays finite
    weights, slots = [0.5, 1.5], [1, 2]
    tiny = torch.finfo(torch.float32).tiny
    expected = []
    for n in range(5):
        total = 0.0
        for c in range(2):
            for s in slots:
                column = sorted(max(float(norms[c][i, s]), tiny) for i in range(5))
                total += (
                    weights[c] / 2.0 * math.log(max(float(norms[c][n, s]), tiny) / column[2]) / len(slots)
                )
        expected.append(total)
    assert relative_norms(norms, weights, slots) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(SpecError, match="needs grid slots"):
        relative_norms(norms, weights, [])


def test_atypical_directions_match_a_loop_of_cosines_with_every_sample() -> None:
    rng = np.random.default_rng(1)
    projected = [torch.tensor(rng.normal(size=(4, 3, 5)), dtype=torch.float32) for _ in range(2)]
    projected[0][3, 2] = 0.0  # a zero gradient has no direction: it adds 0 to everyone's mean
    chunks = [RowChunk(p, p.norm(dim=-1)) for p in projected]
    weights, slots = [1.0, 3.0], [1, 2]

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        size = float(a.norm() * b.norm())
        return float(a @ b) / size if size else 0.0

    expected = []
    for n in range(4):
        total = 0.0
        for c in range(2):
            for s in slots:
                mean_cosine = sum(cosine(projected[c][n, s], projected[c][m, s]) for m in range(4)) / 4
                total -= weights[c] / 4.0 * mean_cosine / len(slots)
        expected.append(total)
    assert atypical_directions(chunks, weights, slots) == pytest.approx(expected, rel=1e-6)
    # a sample pointing against the other three at every slot is the most atypical
    lone = torch.ones(4, 1, 5)
    lone[2] = -1.0
    found = atypical_directions([RowChunk(lone, lone.norm(dim=-1))], [1.0], [0])
    assert int(np.argmax(found)) == 2
    assert found[2] == pytest.approx(0.5)
    assert found[0] == pytest.approx(-0.5)
    with pytest.raises(SpecError, match="needs grid slots"):
        atypical_directions(chunks, weights, [])


def test_group_auc_is_one_against_the_rest_per_group() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.2, 0.7])
    groups = ("outlier", "majority", "outlier", "majority", "majority", "other")
    found = metrics.group_auc(scores, groups)
    assert found == {g: pytest.approx(roc_auc_score([x == g for x in groups], scores)) for g in set(groups)}
    assert found["outlier"] == pytest.approx(1.0)
    assert metrics.group_auc(scores, None) is None
    assert metrics.group_auc(scores, ("a",) * 6) is None


@pytest.mark.parametrize("mix", ["patches+zeros", "digits+faces"])
def test_planted_mixes_hold_four_percent_outliers(mix: str) -> None:
    data = planted_mix(mix, 100, 8, seed=1)
    assert len(data) == 100
    assert (data.groups or ()).count(OUTLIER) == 4
    assert data.images.shape == (100, 1, 8, 8)


def test_detection_end_to_end_reports_every_score(tmp_path) -> None:
    config = OutlierConfig(mix="digits+faces", n_train=50, epochs=2, save_every=1, batch_size=16, grid=2,
                           projector=ProjectorSpec(kind="sketch", dim=512))
    result = detect_outliers(config, tmp_path)
    assert (result.samples, result.outliers) == (50, 2)
    assert set(result.auc) == set(result.recall) == {*OUTLIER_SCORES, "trak", "dtrak"}
    assert all(0 <= v <= 1 for v in (*result.auc.values(), *result.recall.values()))
    assert all(v in (0.0, 0.5, 1.0) for v in result.recall.values())  # 0, 1 or 2 of the 2 outliers


def test_kernel_self_influence_is_the_replayed_step_against_the_preconditioned_grid_mean() -> None:
    # two checkpoints, slots (replay, grid, grid); F = Phi^T Phi + lambda I over every slot's mean, in numpy
    generator = torch.Generator().manual_seed(3)
    chunks = [RowChunk(p, p.norm(dim=-1)) for p in torch.randn(2, 7, 3, 5, generator=generator)]
    kernels = [build_kernel([c], 5, KernelSpec(ridge=0.2)) for c in chunks]
    found = kernel_self_influence(chunks, [0.5, 2.0], ["replay", "grid", "grid"], kernels)
    expected = np.zeros(7)
    for chunk, weight in zip(chunks, [0.5, 2.0], strict=True):
        rows = chunk.projected.double().numpy()
        phi = rows.mean(axis=1)
        gram = phi.T @ phi
        inverse = np.linalg.inv(gram + 0.2 * np.trace(gram) / 5 * np.eye(5))
        expected += weight * np.einsum("nk,kj,nj->n", rows[:, 0], inverse, rows[:, 1:].mean(axis=1))
    np.testing.assert_allclose(found, expected, rtol=1e-4)
