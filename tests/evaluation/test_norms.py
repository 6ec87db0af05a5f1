"""Norm vs timestep: statistics by hand, and stored norms against a plain per-sample autograd loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from api_schemas import IndexSpec, ProjectorSpec, SlotSpec
from retrac.evaluation.norms import analyse_run, norm_curves, norm_timestep_statistics, recompute_slot_norms
from retrac.exceptions import EvaluationError
from retrac.gradients import GradientComputer, loop_gradients
from retrac.noise import noise_from_seeds, query_noise
from retrac.plan import IndexPlan
from retrac.query_side import query_timesteps
from tests.conftest import TINY_DATASET

GRID = np.arange(0, 1000, 100)  # curve grid 0, 100, ..., 900


def test_norm_rising_linearly_with_timestep() -> None:
    t = np.arange(0, 1000, 10)
    norms = 2 + t / 1000  # +1 over the schedule, mean 2.495
    curve = np.stack([2 + GRID / 1000, 2 + GRID / 1000])
    result = norm_timestep_statistics(t, norms, GRID, curve, num_timesteps=1000, checkpoint_epoch=7)
    assert (result.pearson, result.spearman) == pytest.approx((1.0, 1.0))
    assert result.slope == pytest.approx(1.0)
    assert result.relative_slope == pytest.approx(1.0 / 2.495)
    assert result.t_max == 900
    assert result.samples == 100
    assert result.checkpoint_epoch == 7
    assert result.curve_mean_norms == pytest.approx((2 + GRID / 1000).tolist())


def test_norm_peaking_at_t_max_correlates_negatively_with_distance_to_it() -> None:
    t = np.arange(0, 1000, 7)
    norms = 5 - np.abs(t - 300) / 300
    curve = np.stack([5 - np.abs(GRID - 300) / 300, np.full(len(GRID), 1.0)])  # mean still peaks at 300
    result = norm_timestep_statistics(t, norms, GRID, curve, num_timesteps=1000, checkpoint_epoch=1)
    assert result.t_max == 300
    assert (result.distance_pearson, result.distance_spearman) == pytest.approx((-1.0, -1.0))


@pytest.fixture(scope="module")
def plan(tiny_run) -> IndexPlan:
    """The tiny run with replay + 2 grid slots, projected by a small sketch (norms must stay exact)."""
    return IndexPlan.resolve(
        IndexSpec(
            dataset=TINY_DATASET,
            run=str(tiny_run.folder),
            slots=SlotSpec(grid=2, seed=4),
            projector=ProjectorSpec(kind="sketch", dim=16),
            batch_size=8,
        )
    )


def test_slot_norms_match_a_per_sample_autograd_loop(plan: IndexPlan) -> None:
    model = plan.load_model(1)
    timesteps, norms = recompute_slot_norms(plan, 1, plan.gradient_computer(1, model))
    assert timesteps.shape == norms.shape == (48, 3)
    expected_t, seeds = plan.slots(1, slice(0, 48))
    assert torch.equal(timesteps, expected_t)
    assert torch.equal(timesteps[:, 0], plan.run.timesteps[3, :48])  # slot 0: the step of epoch 4
    rows = [0, 17, 47]
    images = plan.dataset.images[rows].repeat_interleave(3, dim=0)
    noise = noise_from_seeds(seeds[rows].reshape(-1), images.shape[1:]).unsqueeze(1)
    reference = loop_gradients(model, plan.loss, images, timesteps[rows].reshape(-1), noise).norm(dim=1)
    torch.testing.assert_close(norms[rows].reshape(-1), reference, rtol=1e-4, atol=0)


def test_norm_curve_matches_a_per_sample_autograd_loop(plan: IndexPlan) -> None:
    model = plan.load_model(2)
    image = plan.dataset.images[5:6]
    grid, curves = norm_curves(GradientComputer(model, plan.loss), image, 6, seed=9)
    assert grid.tolist() == query_timesteps(6, 1000).tolist()
    assert curves.shape == (1, 6)
    noise = query_noise(9, 6, 1, image.shape[1:])  # (K, 1, C, H, W): one draw per timestep
    reference = loop_gradients(model, plan.loss, image.expand(6, -1, -1, -1), torch.from_numpy(grid), noise)
    np.testing.assert_allclose(curves[0], reference.norm(dim=1).numpy(), rtol=1e-4)


def test_analyse_run_writes_finite_statistics_and_plots(tiny_run, tmp_path) -> None:
    result = analyse_run(tiny_run.folder, tmp_path, epoch=4, curve_samples=3, curve_timesteps=10)
    assert result.checkpoint_epoch == 4
    assert result.samples == 48
    assert len(result.curve_mean_norms) == 10
    saved = json.loads((tmp_path / "norms.json").read_text())
    assert saved["spearman"] == pytest.approx(result.spearman)
    assert saved["per_sample"]["ids"] == list(tiny_run.sample_ids)
    assert saved["per_sample"]["timesteps"] == tiny_run.timesteps[3].tolist()  # epoch 4's replayed steps
    assert all(
        np.isfinite(v) for v in (result.pearson, result.spearman, result.slope, result.distance_spearman)
    )
    for name in ("norm_timestep.png", "norm_curve.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(EvaluationError, match="no checkpoint after epoch 3"):
        analyse_run(tiny_run.folder, tmp_path, epoch=3)
