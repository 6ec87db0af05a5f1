"""The noise-prediction loss of a DDPM, per sample, exactly as training computes it.

`l(theta; z, t, eps) = mean_pixels d(eps_theta(x_t, t), eps)` with
`x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps` and `d` squared (`mse`) or absolute (`l1`)
error. Training and gradient code both call `noised` and `distance`, so a replayed step
reproduces the training loss to the last bit.
"""

from __future__ import annotations

import torch

from api_schemas import LossKind

LOSS_KINDS: tuple[LossKind, ...] = ("mse", "l1")


def noised(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward noising `x_t` for images `(B, C, H, W)` at timesteps `(B,)` with noise `(B, C, H, W)`."""
    alpha_bar = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def distance(prediction: torch.Tensor, noise: torch.Tensor, kind: LossKind) -> torch.Tensor:
    """Per-sample loss `(B,)`: the mean over pixels of the squared or absolute error."""
    error = prediction - noise
    pointwise = error.square() if kind == "mse" else error.abs()
    return pointwise.flatten(1).mean(dim=1)
