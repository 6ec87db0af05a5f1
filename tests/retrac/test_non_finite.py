"""A non-finite gradient is refused naming the parameter, the sample, the dtype, and advice only where it holds."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from retrac.exceptions import GradientError
from retrac.gradients import GradientComputer
from retrac.models import DiffusionModel, build_unet
from retrac.plan import IndexPlan
from tests.retrac.conftest import index_spec


def test_broken_weights_are_named_with_the_sample_and_the_advice(replay_run) -> None:
    plan = IndexPlan.resolve(index_spec(replay_run))
    model = plan.load_model(0)
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(GradientError) as caught:
        plan.compute_rows(0, slice(2, 5), plan.gradient_computer(0, model))
    message = str(caught.value)
    assert f"for sample {plan.dataset.ids[2]!r} (row 2) at timestep" in message
    assert "computed in float32" in message and "weights hold NaN or infinite values" in message


def test_an_overflow_with_finite_weights_names_the_layer_without_advice() -> None:
    model = DiffusionModel.from_parts(build_unet("micro", resolution=8, channels=1), DDPMScheduler())
    images = torch.zeros(3, 1, 8, 8)
    images[2] = 1e38  # sample 2 (the second chunk's first) overflows float32 in the forward
    computer = GradientComputer(model, "mse", chunk=2)
    with pytest.raises(GradientError) as caught:
        computer.compute(images, torch.tensor([10, 10, 10]), torch.zeros(3, 1, 1, 8, 8))
    message = str(caught.value)
    assert "for sample 2, computed in float32" in message
    assert message.startswith("non-finite gradient of ") and "weights are finite" in message
    assert "dtype float32" not in message
