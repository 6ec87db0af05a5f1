"""The noise rule as method.md states it, checked at a shape where shortcuts give other numbers."""

from __future__ import annotations

import torch

from retrac.noise import noise_from_seed, query_noise

ODD_SHAPE = (1, 10, 10)
"""100 values per image: not a multiple of 16, where one large randn differs from draws in turn."""


def test_query_noise_draws_each_image_in_turn() -> None:
    generator = torch.Generator("cpu").manual_seed(123)
    expected = torch.stack([torch.randn(ODD_SHAPE, generator=generator) for _ in range(3 * 2)]).reshape(
        3, 2, *ODD_SHAPE
    )
    assert torch.equal(query_noise(123, 3, 2, ODD_SHAPE), expected)


def test_the_shape_is_one_where_a_single_draw_would_differ() -> None:
    generator = torch.Generator("cpu").manual_seed(123)
    single = torch.randn((3, 2, *ODD_SHAPE), generator=generator)
    assert not torch.equal(query_noise(123, 3, 2, ODD_SHAPE), single)


def test_a_seed_gives_the_documented_tensor() -> None:
    generator = torch.Generator("cpu").manual_seed(7)
    assert torch.equal(
        noise_from_seed(7, ODD_SHAPE), torch.randn(ODD_SHAPE, generator=generator, dtype=torch.float32)
    )
