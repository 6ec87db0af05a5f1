"""Retrieval and stability metrics against values computed by hand, and the near-duplicate images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from api_schemas import KernelSpec
from retrac.evaluation import retrieval
from retrac.exceptions import EvaluationError
from retrac.query_side import QueryVectors
from retrac.scoring import RowChunk

# Two queries, four training samples:
#   q0 order: 2 (.9), 0 (.5), 3 (.4), 1 (.1)      q1 order: 1 (.8), 3 (.7), 0 (.3), 2 (.2)
SCORES = np.array([[0.5, 0.1, 0.9, 0.4], [0.3, 0.8, 0.2, 0.7]])
# same queries, another index: q0 order 2, 3, 0, 1; q1 order 3, 1, 2, 0
OTHER = np.array([[0.2, 0.1, 0.8, 0.6], [0.1, 0.6, 0.3, 0.9]])


def test_hit_rate_counts_own_samples_in_the_top_k() -> None:
    # own samples 0 and 1 rank 2nd and 1st
    assert retrieval.hit_rate(SCORES, [0, 1], 1) == pytest.approx(0.5)
    assert retrieval.hit_rate(SCORES, [0, 1], 2) == pytest.approx(1.0)
    assert retrieval.hit_rate(SCORES, [1, 2], 3) == pytest.approx(0.0)  # 4th and 4th
    with pytest.raises(EvaluationError, match="at least 1"):
        retrieval.hit_rate(SCORES, [0, 1], 0)


def test_top_k_overlap_and_spearman_by_hand() -> None:
    # top-2: q0 {2, 0} vs {2, 3} -> 1/2; q1 {1, 3} vs {3, 1} -> 2/2
    assert retrieval.top_k_overlap(SCORES, OTHER, 2) == pytest.approx(0.75)
    assert retrieval.top_k_overlap(SCORES, SCORES, 3) == pytest.approx(1.0)
    # ranks (1 = lowest) q0: (3, 1, 4, 2) vs (2, 1, 4, 3): d^2 = 1+0+0+1 = 2 -> 1 - 6*2/(4*15) = 0.8
    # q1: (2, 4, 1, 3) vs (1, 3, 2, 4): d^2 = 1+1+1+1 = 4 -> 1 - 6*4/60 = 0.6
    assert retrieval.mean_spearman(SCORES, OTHER) == pytest.approx(0.7)
    with pytest.raises(EvaluationError, match="differ in shape"):
        retrieval.mean_spearman(SCORES, OTHER[:1])


def test_full_scores_are_the_paper_and_matched_sums() -> None:
    # one checkpoint (weight 2), two samples with two slots each, k = 2, one query with K = 2 timesteps
    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [0.0, 1.0]]])
    chunk = RowChunk(projected, projected.norm(dim=-1))
    query = QueryVectors(
        per_timestep=torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), timestep_norms=torch.tensor([[2.0, 1.0]]),
        bands=torch.tensor([0, 2]),
    )
    paper = retrieval.full_scores([chunk], [query], [2.0])
    # G = (1, 0.5): sample 0 mean_s g . G = ((1,0).G + (0,2).G)/2 = (1 + 1)/2 = 1 -> x2 = 2
    # sample 1: ((3,4).G + (0,1).G)/2 = (5 + 0.5)/2 = 2.75 -> 5.5
    np.testing.assert_allclose(paper["tracin"], [[2.0, 5.5]])
    # G^ = ((1,0) + (0,1))/2 = (.5, .5); unit slots: s0 (1,0),(0,1) -> (.5 + .5)/2 -> 1.0; s1 (.6,.8),(0,1) ->
    # (.7+.5)/2 -> 1.2
    np.testing.assert_allclose(paper["retrac"], [[1.0, 1.2]], rtol=1e-6)
    matched = retrieval.full_scores([chunk], [query], [2.0], matched=slice(0, 2))
    # slot t with query timestep t: s0 ((1,0).(2,0) + (0,2).(0,1))/2 = (2 + 2)/2 = 2 -> 4; s1 (6 + 1)/2 -> 7
    np.testing.assert_allclose(matched["tracin"], [[4.0, 7.0]])
    # cosines: s0 (1 + 1)/2 -> 2; s1 (0.6 + 1)/2 -> 1.6
    np.testing.assert_allclose(matched["retrac"], [[2.0, 1.6]], rtol=1e-6)


def test_full_scores_of_trak_use_the_kernel_of_the_rows_given() -> None:
    # trak = w phi(z)^T F^{-1} G with F = Phi^T Phi + lambda I over the slot means, computed here in numpy
    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(6, 3, 4, generator=generator)
    chunk = RowChunk(projected, projected.norm(dim=-1))
    per_timestep = torch.randn(2, 3, 4, generator=generator)
    query = QueryVectors(
        per_timestep=per_timestep, timestep_norms=per_timestep.norm(dim=-1), bands=torch.tensor([0, 1, 2])
    )
    phi = projected.double().mean(dim=1).numpy()
    gram = phi.T @ phi
    inverse = np.linalg.inv(gram + 0.5 * np.trace(gram) / 4 * np.eye(4))
    mean = per_timestep.double().mean(dim=1).numpy()
    found = retrieval.full_scores(
        [chunk], [query], [3.0], methods=["trak", "tracin"], kernel=KernelSpec(ridge=0.5)
    )
    np.testing.assert_allclose(found["trak"], 3.0 * mean @ inverse @ phi.T, rtol=1e-4)
    np.testing.assert_allclose(found["tracin"], 3.0 * mean @ phi.T, rtol=1e-5)
    with pytest.raises(EvaluationError, match="need a kernel"):
        retrieval.full_scores([chunk], [query], [3.0], methods=["trak"])


def test_near_duplicates() -> None:
    image = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4) / 12 - 0.5
    moved = retrieval.shifted(image)
    assert torch.equal(moved[..., 1:], image[..., :-1])
    assert torch.equal(moved[..., 0], image[..., 0])
    with pytest.raises(EvaluationError, match="1..3 pixels"):
        retrieval.shifted(image, 4)
    flat = torch.zeros(64, 1, 16, 16)
    noisy = retrieval.noised(flat, std=0.02, seed=1)
    assert float((noisy / 2).std()) == pytest.approx(0.02, rel=0.05)  # 16,384 draws: std within 1%
    assert torch.equal(retrieval.noised(flat, seed=1), noisy)
    smooth = torch.linspace(-1, 1, 16).expand(2, 3, 16, 16).contiguous()
    decoded = retrieval.jpeg_reencoded(smooth, quality=75)
    assert decoded.shape == smooth.shape
    assert 0 < float((decoded - smooth).abs().max()) < 0.1  # lossy, but a smooth ramp survives closely


def test_nearest_training_by_hand() -> None:
    training = torch.tensor([[[[-1.0, -1.0]]], [[[1.0, 1.0]]], [[[0.0, 0.0]]]])  # (3, 1, 1, 2)
    images = torch.tensor([[[[0.9, 1.0]]], [[[-0.2, 0.2]]]])
    positions, rms = retrieval.nearest_training(images, training)
    assert positions.tolist() == [1, 2]
    # [0, 1] scale: (0.05, 0) -> sqrt(0.0025 / 2); (0.1, 0.1) -> 0.1
    np.testing.assert_allclose(rms, [0.05 / 2**0.5, 0.1], rtol=1e-6)  # float32 inputs (0.9)
    with pytest.raises(EvaluationError, match="differ in shape"):
        retrieval.nearest_training(images[:, :, :, :1], training)
