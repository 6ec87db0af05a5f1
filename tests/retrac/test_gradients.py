"""Batched per-sample gradients against a batch-1 autograd loop, on diffusers UNets with attention."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention
from torch.profiler import ProfilerActivity, profile

from api_schemas import ProjectorSpec, QuerySpec
from retrac.gradients import GROUP_BACKWARD_WORK, PHASES, GradientComputer, loop_gradients
from retrac.models import DiffusionModel, build_unet
from retrac.projections import make_projector
from retrac.query_side import query_vectors
from tests.retrac.reference import mean_gradient, query_draws
from tests.tolerances import float32_bound

RELATIVE_TOLERANCE = 1e-5


def model_of(preset: str, resolution: int) -> DiffusionModel:
    return DiffusionModel.from_parts(
        build_unet(preset, resolution=resolution, channels=1, seed=4), DDPMScheduler(num_train_timesteps=1000)
    )


def inputs(
    batch: int, draws: int, resolution: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, resolution, resolution, generator=generator) * 2 - 1
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    noise = torch.randn(batch, draws, 1, resolution, resolution, generator=generator)
    return images, timesteps, noise


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((fast - reference).norm(dim=1) / reference.norm(dim=1)).max())


@pytest.mark.parametrize(
    ("preset", "resolution", "loss", "draws"),
    [("micro", 8, "mse", 1), ("micro", 8, "l1", 3), ("tiny", 16, "mse", 1)],
)
def test_batched_gradients_equal_the_loop(preset: str, resolution: int, loss: str, draws: int) -> None:
    model = model_of(preset, resolution)
    assert any(isinstance(m, Attention) for m in model.unet.modules()), "the model must have attention"
    images, timesteps, noise = inputs(5, draws, resolution)
    fast = GradientComputer(model, loss, chunk=2).flat_gradients(images, timesteps, noise)
    reference = loop_gradients(model, loss, images, timesteps, noise)
    assert fast.shape == reference.shape == (5, sum(p.numel() for p in model.unet.parameters()))
    assert relative_error(fast, reference) < RELATIVE_TOLERANCE


def test_norms_are_exact_and_projection_is_linear() -> None:
    model = model_of("micro", 8)
    images, timesteps, noise = inputs(4, 1, 8, seed=1)
    reference = loop_gradients(model, "mse", images, timesteps, noise)
    for kind in ("identity", "sketch", "dense"):
        projector = make_projector(ProjectorSpec(kind=kind, dim=512, seed=2), reference.shape[1])
        batch = GradientComputer(model, "mse", projector).compute(images, timesteps, noise)
        torch.testing.assert_close(batch.norms, reference.norm(dim=1), rtol=RELATIVE_TOLERANCE, atol=0)
        assert relative_error(batch.projected, projector.project(reference)) < RELATIVE_TOLERANCE


def test_chunking_does_not_change_results() -> None:
    """Other chunks are other batch sizes, so other kernels and summation orders."""
    model = model_of("micro", 8)
    images, timesteps, noise = inputs(6, 1, 8, seed=2)
    whole = GradientComputer(model, "mse", chunk=6).compute(images, timesteps, noise)
    parts = GradientComputer(model, "mse", chunk=4).compute(images, timesteps, noise)
    assert relative_error(parts.projected, whole.projected) <= float32_bound(model.unet, 8)
    assert relative_error(parts.norms[:, None], whole.norms[:, None]) <= float32_bound(model.unet, 8)


def test_thread_counts_agree_within_float32_accumulation() -> None:
    """Bytes are reproducible per (machine, torch, device, thread count); across thread counts the
    values agree within the float32 bound, which is what the README promises."""
    model = model_of("micro", 8)
    batch = inputs(6, 1, 8, seed=3)
    one = GradientComputer(model, "mse").compute(*batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = GradientComputer(model, "mse").compute(*batch)
    finally:
        torch.set_num_threads(threads)
    assert relative_error(two.projected, one.projected) <= float32_bound(model.unet, 8)
    assert relative_error(two.norms[:, None], one.norms[:, None]) <= float32_bound(model.unet, 8)


TINY_PARAMETERS = 701_345
"""Trainable parameters of the tiny preset at 16x16x1: the fewest draws of a query that takes one
backward per group is ceil(GROUP_BACKWARD_WORK / TINY_PARAMETERS) = 15."""


@pytest.mark.parametrize("draws", [4, -(-GROUP_BACKWARD_WORK // TINY_PARAMETERS)])
def test_query_vectors_equal_one_autograd_call_per_timestep(draws: int) -> None:
    """The query side's groups of M draws (layer-wise over all K*M copies, or one backward per group
    past GROUP_BACKWARD_WORK) give each `h(q, t)`: the reference takes it by one plain backward
    of the mean loss per timestep."""
    model = model_of("tiny", 16)
    assert sum(p.numel() for p in model.unet.parameters()) == TINY_PARAMETERS
    image = inputs(1, 1, 16, seed=4)[0]
    spec = QuerySpec(timesteps=3, draws=draws, seed=5)
    grid = torch.linspace(1, 999, spec.timesteps, dtype=torch.float64).floor().long().tolist()
    noise = query_draws(spec.seed, spec.timesteps, spec.draws, (1, 16, 16))
    reference = torch.stack(
        [mean_gradient(model.unet, model.scheduler, image[0], t, noise[k], "mse") for k, t in enumerate(grid)]
    )
    projector = make_projector(ProjectorSpec(kind="sketch", dim=4096, seed=6), reference.shape[1])
    vectors = query_vectors(GradientComputer(model, "mse", projector), image, spec)
    exact_norms = reference.double().norm(dim=1).float()
    torch.testing.assert_close(vectors.timestep_norms[0], exact_norms, rtol=RELATIVE_TOLERANCE, atol=0)
    assert relative_error(vectors.per_timestep[0], projector.project(reference)) < RELATIVE_TOLERANCE


def test_a_profile_splits_compute_by_phase() -> None:
    """bench/gradients.py reads these labels; each phase and each layer type's rule must show."""
    model = model_of("micro", 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        GradientComputer(model, "mse").compute(*inputs(2, 1, 8))
    labels = {event.key for event in prof.key_averages()}
    rules = {f"{PHASES[2]} {kind}" for kind in ("Conv2d", "Linear", "GroupNorm")}
    assert {*PHASES[:2], PHASES[3], *rules} <= labels
