"""The paper's recipe: the clipped cosine schedule against its formula, a run trained with it, and its
query setting (K = 100, M = 16) answering through the one attribution path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from api_schemas import IndexSpec, ProjectorSpec, SlotSpec, TrainSpec
from retrac.attribution import Attributor
from retrac.datasets import load_dataset
from retrac.models import load_scheduler
from retrac.plan import IndexPlan
from retrac.training import PAPER_BETA_RANGE, RECIPES, clipped_cosine_betas, train
from tests.retrac.conftest import DIGITS

torch.set_num_threads(1)


def test_clipped_cosine_betas_follow_the_formula_one_step_at_a_time() -> None:
    count = 1000

    def alpha_bar(t: int) -> float:
        return math.cos((t / count + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(max(1 - alpha_bar(t + 1) / alpha_bar(t), 1e-4), 0.02) for t in range(count)]
    betas = clipped_cosine_betas(count)
    assert betas == pytest.approx(expected, rel=1e-12)
    assert betas.min() == PAPER_BETA_RANGE[0]
    assert betas.max() == PAPER_BETA_RANGE[1]  # both clips bite
    assert (np.diff(betas) >= 0).all()


def test_a_paper_recipe_run_saves_that_schedule_and_its_loss(tmp_path) -> None:
    recipe = RECIPES["paper"]
    spec = TrainSpec(dataset=DIGITS, preset="micro", epochs=1, batch_size=16, save_every=1, **recipe.train)
    run = train(spec, load_dataset(DIGITS), tmp_path / "run")
    scheduler = load_scheduler(run.scheduler_folder)
    assert scheduler.config.num_train_timesteps == 1000
    assert run.loss == "l1"
    # diffusers keeps trained betas as float32; alpha_bar is their running product.
    expected = torch.tensor(clipped_cosine_betas(1000), dtype=torch.float32)
    assert torch.equal(scheduler.betas, expected)
    assert torch.equal(scheduler.alphas_cumprod, torch.cumprod(1 - expected, dim=0))

    plan = IndexPlan.resolve(IndexSpec(dataset=DIGITS, run=str(run.folder), slots=SlotSpec(replay=True),
                                       projector=ProjectorSpec(kind="identity")))
    assert plan.loss == "l1"
    # The recipe's query (K = 100, M = 16) is the estimator the index answers with.
    assert (recipe.query.timesteps, recipe.query.draws) == (100, 16)
    result = Attributor(plan).attribute(plan.dataset.images[:1], recipe.query, top_k=3)[0]
    assert [e.rank for e in result.methods["retrac"].proponents] == [1, 2, 3]
