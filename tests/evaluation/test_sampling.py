"""Generated queries: seeded, shaped like training images, in [-1, 1]."""

from __future__ import annotations

import pytest
import torch

from retrac.evaluation.sampling import generate
from retrac.exceptions import EvaluationError
from retrac.models import load_scheduler, load_unet


@pytest.fixture(scope="module")
def last_checkpoint(tiny_run):
    return load_unet(tiny_run.checkpoints()[-1].path), load_scheduler(tiny_run.scheduler_folder)


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 4), ("ddpm", 6)])
def test_same_seed_same_images_other_seed_other_images(last_checkpoint, sampler, steps) -> None:
    unet, scheduler = last_checkpoint
    first = generate(unet, scheduler, 3, sampler=sampler, steps=steps, seed=5)
    again = generate(unet, scheduler, 3, sampler=sampler, steps=steps, seed=5)
    other = generate(unet, scheduler, 3, sampler=sampler, steps=steps, seed=6)
    assert first.shape == (3, 1, 8, 8)
    assert first.dtype == torch.float32
    assert first.min() >= -1
    assert first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first[0], first[1])  # one generator, distinct draws per image


def test_bad_sampler_or_count_is_a_named_error(last_checkpoint) -> None:
    unet, scheduler = last_checkpoint
    with pytest.raises(EvaluationError, match="unknown sampler"):
        generate(unet, scheduler, 1, sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match="at least one"):
        generate(unet, scheduler, 0)
