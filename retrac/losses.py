"""The DDPM training loss, per sample, exactly as training computes it.

`l(theta; z, t, eps) = mean_pixels d(f_theta(x_t, t), y)` with `x_t` the scheduler's `add_noise`
(`sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps`), the target `y` the noise `eps` (epsilon), the
scheduler's `get_velocity` (v_prediction) or the clean image `x` (sample), and `d` squared (`mse`)
or absolute (`l1`) error. The schedule is diffusers' own scheduler object, never a copy of its
formulas. Training and gradient code both call `noised`, `target` and `distance`, so a replayed
step reproduces the training loss to the last bit.
"""

from __future__ import annotations

import torch

from api_schemas import LossKind, PredictionType
from retrac.exceptions import SpecError
from retrac.models import Scheduler

LOSS_KINDS: tuple[LossKind, ...] = ("mse", "l1")


def noised(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, scheduler: Scheduler) -> torch.Tensor:
    """Forward noising `x_t` for images `(B, C, H, W)` at timesteps `(B,)` with noise `(B, C, H, W)`."""
    return scheduler.add_noise(x0, noise, timesteps)


def target(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, scheduler: Scheduler) -> torch.Tensor:
    """What the UNet is trained to output for `x_t = noised(x0, timesteps, noise)`, `(B, C, H, W)`."""
    kind: PredictionType = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise SpecError(f"unknown prediction type {kind!r}; choose epsilon, v_prediction or sample")


def distance(prediction: torch.Tensor, wanted: torch.Tensor, kind: LossKind) -> torch.Tensor:
    """Per-sample loss `(B,)`: the mean over pixels of the squared or absolute error."""
    error = prediction - wanted
    pointwise = error.square() if kind == "mse" else error.abs()
    return pointwise.flatten(1).mean(dim=1)
