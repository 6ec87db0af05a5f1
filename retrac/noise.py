"""The noise rule: how a noise seed becomes a noise image. It is part of the store's format.

Seed `s` gives `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=float32)`,
drawn on the CPU and only then moved to the device, so a stored gradient can be recomputed
bit-for-bit from (checkpoint, sample, timestep, seed) on any hardware.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_SEED = (1 << 62) - 1
"""Seeds are drawn in [0, MAX_SEED]: they fit int64 stores and torch's manual_seed."""


def noise_from_seed(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """One noise image for one seed, shape `shape`, float32 on the CPU."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_from_seeds(seeds: torch.Tensor | Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Noise for each seed of `seeds` (any shape `L`), stacked to `(*L, *shape)`."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    flat = [noise_from_seed(int(s), shape) for s in seeds.reshape(-1).tolist()]
    stacked = torch.stack(flat) if flat else torch.empty((0, *shape))
    return stacked.reshape(*seeds.shape, *shape)


def draw_seeds(generator: torch.Generator, count: int) -> torch.Tensor:
    """`count` fresh noise seeds from `generator`, int64 in [0, MAX_SEED]."""
    return torch.randint(0, MAX_SEED, (count,), generator=generator, dtype=torch.int64)


def query_noise(seed: int, timesteps: int, draws: int, shape: Sequence[int]) -> torch.Tensor:
    """The query's noise, `(K, M, *shape)`: one CPU generator seeded with `seed` draws, for each
    timestep of the grid in order, its M noise images in turn (method.md section 3)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    # One randn per image, not one randn of (K, M, *shape): torch's CPU randn fills blocks of 16 values,
    # so a single large draw differs from draws in turn whenever prod(shape) is not a multiple of 16.
    images = [
        torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(timesteps * draws)
    ]
    stacked = torch.stack(images) if images else torch.empty((0, *shape))
    return stacked.reshape(timesteps, draws, *shape)
