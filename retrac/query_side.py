"""The query-side estimator (method.md section 3): TracIn and ReTrac query vectors of images.

For a query image q at one checkpoint, with the grid `S_K = floor(linspace(1, T-1, K))` and M noise
draws per timestep:

    h(q, t)  = (1/M) sum_m g(theta; q, t, eps_m)       the gradient of the mean loss over M draws
    G(q)     = (1/K) sum_t P h(q, t)                     TracIn query vector
    G^(q)    = (1/K) sum_t P h(q, t) / ||h(q, t)||       ReTrac query vector (norm before projection)

Every query image uses the same seeded draws (`retrac.noise.query_noise`), so a query's vectors do
not depend on which other images share its batch, and the same draws serve every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from api_schemas import QuerySpec
from retrac.gradients import GradientComputer, inverse_norms, whole_groups
from retrac.noise import query_noise


@dataclass(frozen=True)
class QueryVectors:
    """Query vectors of Q images at one checkpoint: `tracin`, `retrac` `(Q, k)`; `timestep_norms` `(Q, K)`."""

    tracin: torch.Tensor
    retrac: torch.Tensor
    timestep_norms: torch.Tensor


def query_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """The grid `floor(linspace(1, T-1, K))`, int64 `(K,)`."""
    return torch.linspace(1, num_timesteps - 1, count, dtype=torch.float64).floor().to(torch.int64)


def query_vectors(
    computer: GradientComputer,
    images: torch.Tensor,
    spec: QuerySpec,
    on_images: Callable[[int], None] | None = None,
) -> QueryVectors:
    """TracIn and ReTrac query vectors of `images` `(Q, C, H, W)` at the computer's checkpoint.

    `on_images(n)` is called after each gradient batch with the n images whose K timesteps it completed.
    """
    count, k_steps = images.shape[0], spec.timesteps
    timesteps = query_timesteps(k_steps, computer.model.num_timesteps)
    noise = query_noise(spec.seed, k_steps, spec.draws, images.shape[1:])
    # One gradient group per (image, timestep): Q*K groups of M noised copies each.
    batch = computer.compute(
        images.repeat_interleave(k_steps, dim=0),
        timesteps.repeat(count),
        noise.repeat(count, 1, 1, 1, 1),
        whole_groups(on_images, k_steps) if on_images is not None else None,
    )
    projected = batch.projected.reshape(count, k_steps, -1)
    norms = batch.norms.reshape(count, k_steps)
    normalised = projected * inverse_norms(norms).unsqueeze(-1)
    return QueryVectors(tracin=projected.mean(dim=1), retrac=normalised.mean(dim=1), timestep_norms=norms)
