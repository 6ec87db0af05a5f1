"""The DDPM training loss, per sample, exactly as training computes it.

`l(theta; z, t, eps) = w(t) mean_pixels d(f_theta(x_t, t), y)` with `x_t` the scheduler's `add_noise`
(`sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps`), the target `y` the noise `eps` (epsilon), the
scheduler's `get_velocity` (v_prediction) or the clean image `x` (sample), `d` squared (`mse`)
or absolute (`l1`) error, and the weight `w(t)` 1 (`none`) or the signal-to-noise ratio
`alpha_bar_t / (1 - alpha_bar_t)` (`snr`: diffusers' `train_unconditional.py` trains sample-prediction
models so). The schedule is diffusers' own scheduler object, never a copy of its formulas. Training
and gradient code both call `per_sample_loss`, so a replayed step reproduces the training loss to
the last bit.

`per_sample_output` is the function an index differentiates (`IndexSpec.output_function`): that loss,
or D-TRAK's output norm `mean_pixels f_theta(x_t, t)^2` of the model's raw output (the predicted noise,
velocity or clean image, whatever the model predicts), unweighted, at the same `x_t`.
"""

from __future__ import annotations

import torch

from api_schemas import LossKind, LossWeighting, OutputFunction, PredictionType
from retrac.exceptions import SpecError
from retrac.models import Scheduler

LOSS_KINDS: tuple[LossKind, ...] = ("mse", "l1")
LOSS_WEIGHTINGS: tuple[LossWeighting, ...] = ("none", "snr")


def per_sample_loss(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    scheduler: Scheduler,
    kind: LossKind,
    weighting: LossWeighting = "none",
) -> torch.Tensor:
    """`l` of the module docstring `(B,)`, for the UNet's `prediction` on `noised(x0, timesteps, noise)`."""
    values = distance(prediction, target(x0, timesteps, noise, scheduler), kind)
    return values if weighting == "none" else loss_weights(timesteps, scheduler, weighting) * values


def per_sample_output(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    scheduler: Scheduler,
    kind: LossKind,
    weighting: LossWeighting = "none",
    output: OutputFunction = "loss",
) -> torch.Tensor:
    """`(B,)`: the loss (`per_sample_loss`) or the output norm `mean_pixels prediction^2` (see above)."""
    if output == "loss":
        return per_sample_loss(prediction, x0, timesteps, noise, scheduler, kind, weighting)
    if output == "output-norm":
        return prediction.square().flatten(1).mean(dim=1)
    raise SpecError(f"unknown output function {output!r}; choose loss or output-norm")


def noised(
    x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, scheduler: Scheduler
) -> torch.Tensor:
    """Forward noising `x_t` for images `(B, C, H, W)` at timesteps `(B,)` with noise `(B, C, H, W)`."""
    return scheduler.add_noise(x0, noise, timesteps)


def target(
    x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, scheduler: Scheduler
) -> torch.Tensor:
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


def loss_weights(timesteps: torch.Tensor, scheduler: Scheduler, weighting: LossWeighting) -> torch.Tensor:
    """`w(t)` `(B,)` float32 of timesteps `(B,)`; `snr` is computed in float32 from the scheduler's
    `alphas_cumprod`, as diffusers' `train_unconditional.py` computes it."""
    if weighting == "none":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if weighting == "snr":
        alpha_bar = scheduler.alphas_cumprod.to(device=timesteps.device)[timesteps].float()
        return alpha_bar / (1 - alpha_bar)
    raise SpecError(f"unknown loss weighting {weighting!r}; choose one of {list(LOSS_WEIGHTINGS)}")


def check_weighting(scheduler: Scheduler, weighting: LossWeighting) -> None:
    """A SpecError if `weighting` is unknown, or infinite at some timestep of the schedule
    (`snr` where `alpha_bar_t = 1`, a zero beta): the model could not have been trained so."""
    if weighting not in LOSS_WEIGHTINGS:
        raise SpecError(f"unknown loss weighting {weighting!r}; choose one of {list(LOSS_WEIGHTINGS)}")
    if weighting == "snr" and not bool((scheduler.alphas_cumprod.float() < 1).all()):
        raise SpecError(
            "the snr loss weighting is infinite where alpha_bar_t = 1 (a zero beta) in this schedule"
        )
