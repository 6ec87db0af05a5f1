"""Per-sample loss gradients of a diffusion model, projected, with their exact norms.

A "sample" here is a group: one clean image, one timestep and G noise images; its gradient is that
of the mean loss over the G noised copies. Training-side gradients use G = 1 (one replayed or slot
noise); the query side uses G = M draws, which gives `h(q, t)` of method.md directly.

`GradientComputer` computes a batch of them at once with `torch.func.vmap(grad(...))` on the
unmodified diffusers UNet: one batched forward and backward, no Python loop over samples.
`loop_gradients` is the plain reference (one autograd call per sample) that tests compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from api_schemas import LossKind
from retrac.losses import distance, noised
from retrac.models import DiffusionModel
from retrac.projections import IdentityProjector, Projector

DEFAULT_CHUNK = 32
"""Samples per vmap call: memory grows as chunk * P floats (22 MB per sample for a 5.6M UNet)."""


@dataclass(frozen=True)
class GradientBatch:
    """Projected gradients `(B, k)` and exact L2 norms `(B,)` of the unprojected ones, float32."""

    projected: torch.Tensor
    norms: torch.Tensor


def trainable_parameters(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The parameters gradients are taken over, in a fixed order (the flattening order)."""
    return {name: p.detach() for name, p in model.unet.named_parameters() if p.requires_grad}


def num_parameters(model: DiffusionModel) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def group_loss(
    model: DiffusionModel,
    loss: LossKind,
    params: dict[str, torch.Tensor],
    image: torch.Tensor,
    timestep: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean loss of one image `(C, H, W)` at one timestep `()` over G noises `(G, C, H, W)`."""
    draws = noise.shape[0]
    timesteps = timestep.expand(draws)
    x_t = noised(image.unsqueeze(0).expand_as(noise), timesteps, noise, model.alphas_cumprod)
    buffers = dict(model.unet.named_buffers())
    prediction = functional_call(model.unet, (params, buffers), (x_t, timesteps)).sample
    return distance(prediction, noise, loss).mean()


class GradientComputer:
    """Batched per-sample gradients of one model and loss, projected by one projector.

    Shapes: images `(B, C, H, W)`, timesteps `(B,)` int, noise `(B, G, C, H, W)`.
    """

    def __init__(
        self,
        model: DiffusionModel,
        loss: LossKind,
        projector: Projector | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self.model, self.loss, self.chunk = model, loss, chunk
        self.params = trainable_parameters(model)
        self.num_params = sum(p.numel() for p in self.params.values())
        self.projector = projector or IdentityProjector(self.num_params)
        self.device = next(iter(self.params.values())).device

        def one(params: dict[str, torch.Tensor], image, timestep, noise) -> torch.Tensor:
            return group_loss(model, loss, params, image, timestep, noise)

        self._batched_grad = vmap(grad(one), in_dims=(None, 0, 0, 0))

    def flat_gradients(self, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Unprojected per-sample gradients `(B, P)` for one chunk."""
        grads = self._batched_grad(
            self.params, images.to(self.device), timesteps.to(self.device), noise.to(self.device)
        )
        return torch.cat([g.reshape(images.shape[0], -1) for g in grads.values()], dim=1)

    def compute(self, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> GradientBatch:
        """Projected gradients and exact norms for any B, in chunks of `self.chunk`."""
        projected, norms = [], []
        for start in range(0, images.shape[0], self.chunk):
            part = slice(start, start + self.chunk)
            flat = self.flat_gradients(images[part], timesteps[part], noise[part])
            norms.append(torch.linalg.vector_norm(flat, dim=1))
            projected.append(self.projector.project(flat))
        return GradientBatch(torch.cat(projected).float(), torch.cat(norms).float())


def loop_gradients(
    model: DiffusionModel, loss: LossKind, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Reference: unprojected per-sample gradients `(B, P)`, one ordinary autograd call per sample."""
    params = [p for p in model.unet.parameters() if p.requires_grad]
    named = dict(model.unet.named_parameters())
    rows = []
    for b in range(images.shape[0]):
        value = group_loss(model, loss, named, images[b], timesteps[b], noise[b])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)
