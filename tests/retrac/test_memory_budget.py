"""Batches from a memory budget: the batch follows the budget, never the answer; one group that
cannot fit is refused in one line, before a forward runs, and from the CLI with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from api_schemas import ProjectorSpec, QuerySpec
from cli import main
from retrac.budget import MemoryBudgetError, parse_bytes
from retrac.conditions import Conditions
from retrac.gradients import GradientComputer, num_parameters
from retrac.models import DiffusionModel, build_unet
from retrac.projections import make_projector
from retrac.query_side import query_vectors
from storage import GradientStore
from tests.storage.helpers import tiny_index_spec
from tests.tolerances import float32_bound, gamma

RESOLUTION = 8
SKETCH = 256
UNLIMITED = 1 << 50


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def micro_model() -> DiffusionModel:
    unet = build_unet("micro", resolution=RESOLUTION, channels=1, seed=5)
    return DiffusionModel.from_parts(unet, DDPMScheduler(num_train_timesteps=1000))


def batch_of(count: int, draws: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    return (
        torch.rand(count, 1, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1,
        torch.randint(0, 1000, (count,), generator=generator),
        torch.randn(count, draws, 1, RESOLUTION, RESOLUTION, generator=generator),
    )


def computer_at(model: DiffusionModel, groups: int, draws: int) -> GradientComputer:
    """A computer whose budget holds exactly `groups` groups of `draws` copies by its own estimate."""
    projector = make_projector(ProjectorSpec(kind="sketch", dim=SKETCH, seed=1), num_parameters(model))
    computer = GradientComputer(model, "mse", projector, chunk=32, budget=UNLIMITED)
    computer.batch_size(*batch_of(1, draws), Conditions())  # counts one copy's activations
    computer.budget = computer.footprint(draws).bytes_at(groups, draws)
    return computer


@pytest.mark.parametrize(
    ("text", "expected"), [("8GiB", 8 << 30), ("1.5 GB", 1_500_000_000), ("512mib", 512 << 20)]
)
def test_sizes_read_with_units(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["0", "8 gigs", "-1GiB"])
def test_a_size_without_sense_is_refused(text: str) -> None:
    with pytest.raises(Exception, match="give a positive size with a unit"):
        parse_bytes(text)


def test_the_batch_is_the_largest_the_budget_holds() -> None:
    model = micro_model()
    for groups in (1, 3, 7):
        assert computer_at(model, groups, 1).batch_size(*batch_of(9), Conditions()) == groups
    unlimited = computer_at(model, 1, 1)
    unlimited.budget = UNLIMITED
    assert unlimited.batch_size(*batch_of(9), Conditions()) == 32  # the spec's batch caps it


def test_the_batch_never_changes_the_scores() -> None:
    """Rows computed 2 at a time and queries 1 group at a time score as those computed at once, within
    the float32 bound of a gradient in another summation order (`float32_bound`) plus the k-term sums
    of the scores (`gamma`), relative to |query| |row|."""
    model = micro_model()
    images, timesteps, noise = batch_of(6)
    query = QuerySpec(timesteps=4, draws=3, seed=2)
    whole = computer_at(model, 1, 1)
    whole.budget = UNLIMITED
    rows = whole.compute(images, timesteps, noise).projected
    vectors = query_vectors(whole, images[:2], query).tracin
    small_rows = computer_at(model, 2, 1).compute(images, timesteps, noise).projected
    small_vectors = query_vectors(computer_at(model, 1, query.draws), images[:2], query).tracin
    scale = vectors.norm(dim=1)[:, None] * rows.norm(dim=1)[None, :]
    bound = 2 * float32_bound(model.unet, RESOLUTION) + 2 * gamma(SKETCH)
    assert float(((small_vectors @ small_rows.T - vectors @ rows.T).abs() / scale).max()) <= bound
    assert not torch.equal(small_vectors @ small_rows.T, torch.zeros(2, 6))


def test_one_group_past_the_budget_is_refused_with_its_bytes() -> None:
    computer = computer_at(micro_model(), 1, 1)
    computer.budget -= 1
    with pytest.raises(MemoryBudgetError) as refused:
        computer.compute(*batch_of(3))
    message = str(refused.value)
    assert "\n" not in message
    assert "needs" in message
    assert "at batch 1" in message
    assert "--memory-budget" in message


def test_gradients_past_the_budget_are_refused_before_a_forward() -> None:
    """Weights and per-sample gradients alone over the budget: refused without counting activations."""
    model = micro_model()
    computer = GradientComputer(model, "mse", chunk=8, budget=1 << 20)  # identity rows: P floats each
    forwards: list[int] = []
    model.unet.register_forward_hook(lambda *_: forwards.append(1))
    with pytest.raises(MemoryBudgetError, match="needs"):
        computer.compute(*batch_of(2))
    assert forwards == []


def test_the_cli_refuses_a_store_past_its_budget_with_exit_code_2(
    tiny_run: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "index.zarr"
    GradientStore.create(path, tiny_index_spec(tiny_run))  # type: ignore[arg-type]
    assert main(["index", "run", str(path), "--device", "cpu", "--memory-budget", "64MiB"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs" in error
    assert "the memory budget is 64 MiB" in error
