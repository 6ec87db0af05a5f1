"""Reference computations written from docs/method.md with plain diffusers and torch: no retrac code.

Tests compare the engine against these, so a wrong rule in the engine cannot also hide in its check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel


def seeded_noise(seed: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The store's noise rule (method.md section 2): one CPU generator per seed, float32."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


def per_sample_losses(
    unet: UNet2DModel, scheduler: DDPMScheduler, images: torch.Tensor, timesteps: torch.Tensor,
    noise: torch.Tensor, loss: str, class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`l(theta; z, t, eps) = mean_pixels d(eps_theta(x_t, t[, y]), eps)` `(B,)`, with x_t from
    `add_noise` and, for a class-conditional UNet, each sample's class label `y` `(B,)`."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    prediction = unet(noisy, timesteps, class_labels=class_labels).sample
    pointwise = F.mse_loss if loss == "mse" else F.l1_loss
    return pointwise(prediction, noise, reduction="none").flatten(1).mean(dim=1)


def autograd_gradient(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    image: torch.Tensor,
    timestep: int,
    noise: torch.Tensor,
    loss: str,
) -> torch.Tensor:
    """The flat gradient over all parameters of one sample's loss, by one autograd call."""
    value = per_sample_losses(unet, scheduler, image[None], torch.tensor([timestep]), noise[None], loss)[0]
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(unet.parameters()))])


def mean_gradient(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    image: torch.Tensor,
    timestep: int,
    noises: torch.Tensor,
    loss: str,
    class_label: int | None = None,
) -> torch.Tensor:
    """The flat gradient of the mean loss of one image (of class `class_label`, for a class-conditional
    UNet) at one timestep over noises `(G, C, H, W)`: `h(q, t)` of method.md section 3, by one autograd
    call."""
    count = noises.shape[0]
    images, steps = image.expand(count, *image.shape), torch.full((count,), timestep)
    labels = None if class_label is None else torch.full((count,), class_label)
    value = per_sample_losses(unet, scheduler, images, steps, noises, loss, labels).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(unet.parameters()))])


def query_draws(seed: int, timesteps: int, draws: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The query's noise (method.md section 3) `(K, M, *shape)`: one CPU generator, each timestep's M
    images in turn, one `randn(shape)` each."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.stack([
        torch.stack([torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(draws)])
        for _ in range(timesteps)
    ])


def slot_scores(
    train_side: list[torch.Tensor], query_side: list[torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """(N, Q) TracIn and ReTrac scores of one checkpoint (method.md sections 1-4) from flat gradients:
    `train_side[n]` `(S, P)` sample n's slots, `query_side[q]` `(K, P)` query q's `h(q, t)` per timestep.
    Slot scores are averaged over a sample's slots; ReTrac normalises each slot and each timestep."""
    scores = {method: torch.zeros(len(train_side), len(query_side)) for method in ("tracin", "retrac")}
    for q, hs in enumerate(query_side):
        tracin, retrac = hs.mean(0), (hs / hs.norm(dim=1, keepdim=True)).mean(0)
        for n, g in enumerate(train_side):
            scores["tracin"][n, q] = weight * (g @ tracin).mean()
            scores["retrac"][n, q] = weight * ((g / g.norm(dim=1, keepdim=True)) @ retrac).mean()
    return scores
