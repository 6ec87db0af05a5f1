"""Classifier-free guidance in generated queries: the guided prediction is the formula computed from two
plain diffusers forwards, a guided DDIM run equals a loop written from the scheduler alone, and models
without a null class (a UNet2DModel's class embedding) are refused guidance in one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from retrac.evaluation.sampling import generate, guided_prediction, null_label
from retrac.exceptions import EvaluationError
from retrac.models import build_unet
from tests.retrac.dit_model import CLASSES, TIMESTEPS, tiny_dit

torch.set_num_threads(1)

PREDICTION_TOLERANCE = 1e-5
"""Absolute, on predictions of size ~1: one batched forward of 2B images against two of B each, the same
float32 sums over ~100-wide dot products blocked differently (a few 1e-7 each, through two blocks)."""
SAMPLE_TOLERANCE = 1e-4
"""Absolute, on images in [-1, 1] after 3 DDIM steps: each step's prediction differs by
PREDICTION_TOLERANCE at most and is scaled by sqrt((1 - alpha_bar) / alpha_bar) <= ~10 on this schedule."""


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(seed=4).eval()


def prediction(dit, x: torch.Tensor, t: int, label: int) -> torch.Tensor:
    with torch.no_grad():
        count = x.shape[0]
        return dit(x, timestep=torch.full((count,), t), class_labels=torch.full((count,), label)).sample


def test_the_guided_prediction_is_the_formula(dit) -> None:
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == CLASSES + 1
    assert null_label(dit) == CLASSES  # null row after the classes
    x, scale = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 2.5
    with torch.no_grad():
        got = guided_prediction(dit, x, torch.tensor(40), torch.tensor([4, 4, 4]), scale, CLASSES)
    conditional, unconditional = prediction(dit, x, 40, 4), prediction(dit, x, 40, CLASSES)
    torch.testing.assert_close(got, unconditional + scale * (conditional - unconditional), rtol=0,
                               atol=PREDICTION_TOLERANCE)
    assert float((conditional - unconditional).abs().max()) > 100 * PREDICTION_TOLERANCE  # the label matters


def reference_sampling(dit, count: int, steps: int, seed: int, label: int, scale: float) -> torch.Tensor:
    """DDIM (eta 0) from the scheduler alone: noise from one seeded CPU generator, the guided prediction
    from two separate forwards per step."""
    scheduler = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=TIMESTEPS).config)
    scheduler.set_timesteps(steps)
    x = torch.randn((count, 1, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    for t in scheduler.timesteps:
        conditional, unconditional = prediction(dit, x, int(t), label), prediction(dit, x, int(t), CLASSES)
        x = scheduler.step(unconditional + scale * (conditional - unconditional), t, x).prev_sample
    return x.clamp(-1, 1)


def test_guided_generation_equals_the_reference_loop(dit) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)
    knobs = dict(sampler="ddim", steps=3, seed=9, label=4)
    guided = generate(dit, scheduler, 2, guidance_scale=3.0, **knobs)
    expected = reference_sampling(dit, 2, 3, 9, 4, 3.0)
    torch.testing.assert_close(guided, expected, rtol=0, atol=SAMPLE_TOLERANCE)
    unguided = generate(dit, scheduler, 2, **knobs)
    torch.testing.assert_close(generate(dit, scheduler, 2, guidance_scale=1.0, **knobs), unguided, rtol=0,
                               atol=SAMPLE_TOLERANCE)  # s = 1 is the conditional prediction itself
    assert float((guided - unguided).abs().max()) > 100 * SAMPLE_TOLERANCE
    other_label = generate(dit, scheduler, 2, **{**knobs, "label": 7})
    assert float((other_label - unguided).abs().max()) > 100 * SAMPLE_TOLERANCE


def test_conditions_that_do_not_fit_the_model_are_refused(dit) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)
    labelled_unet = build_unet("micro", resolution=8, channels=1, num_class_embeds=3)
    with pytest.raises(EvaluationError, match="no null class .a UNet2DModel's class embedding") as caught:
        generate(labelled_unet, scheduler, 1, sampler="ddim", steps=2, label=1, guidance_scale=2.0)
    assert "\n" not in str(caught.value)
    generate(labelled_unet, scheduler, 1, sampler="ddim", steps=2, label=1)  # unguided: fine
    with pytest.raises(EvaluationError, match="class-conditional: give the label"):
        generate(dit, scheduler, 1, sampler="ddim", steps=2)
    with pytest.raises(EvaluationError, match="label 10 is not one of the model's classes 0..9"):
        generate(dit, scheduler, 1, sampler="ddim", steps=2, label=CLASSES)
    unconditional = build_unet("micro", resolution=8, channels=1)
    with pytest.raises(EvaluationError, match="unconditional: generate without a label"):
        generate(unconditional, scheduler, 1, sampler="ddim", steps=2, label=0)
