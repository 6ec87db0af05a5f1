"""Self-influence from stored slots, and checkpoints trained elsewhere (no replay record)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from api_schemas import CheckpointSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.plan import IndexPlan
from retrac.scoring import self_influence
from tests.retrac.conftest import DIGITS, index_spec
from tests.retrac.reference import autograd_gradient, seeded_noise

SCORE_TOLERANCE = 1e-4
"""Relative: vmapped float32 gradients against one autograd call each (~3e-6 per coordinate, design.md),
summed over ~1e5 parameters in the dot products."""


def test_self_influence_from_slots_equals_reference_dot_products(replay_run, digits) -> None:
    plan = IndexPlan.resolve(index_spec(replay_run, kind="identity", grid=3))
    rows = Attributor(plan).index()
    got = self_influence(rows, plan.weights, train_slots=[0], query_slots=[1, 2, 3])
    expected = {"tracin": torch.zeros(len(digits)), "retrac": torch.zeros(len(digits))}
    scheduler = DDPMScheduler.from_pretrained(replay_run.scheduler_folder)
    for c, weight in enumerate(plan.weights):
        unet = UNet2DModel.from_pretrained(plan.checkpoints[c].path).eval()
        timesteps, seeds = rows[c].timesteps, rows[c].seeds
        # slot 0 is the replayed step of the checkpoint's epoch, slots 1-3 the grid floor(linspace(1, T-1, 3))
        assert torch.equal(timesteps[:, 0], replay_run.timesteps[plan.checkpoints[c].epoch - 1])
        assert timesteps[:, 1:].tolist() == [[1, 500, 999]] * len(digits)
        for n in range(len(digits)):
            image = digits.images[n]
            g = torch.stack([
                autograd_gradient(unet, scheduler, image, int(t), seeded_noise(s, image.shape), "l1")
                for t, s in zip(timesteps[n].tolist(), seeds[n].tolist(), strict=True)
            ])
            expected["tracin"][n] += weight * (g[0] @ g[1:].mean(0))
            expected["retrac"][n] += (
                weight * (g[0] / g[0].norm()) @ (g[1:] / g[1:].norm(dim=1, keepdim=True)).mean(0)
            )
    for method in ("tracin", "retrac"):
        scale = float(expected[method].abs().max())
        torch.testing.assert_close(got[method], expected[method], rtol=SCORE_TOLERANCE, atol=1e-6 * scale)


def test_grid_slots_are_the_query_grid_and_independent_of_sharding(replay_run) -> None:
    plan = IndexPlan.resolve(index_spec(replay_run, grid=4))
    timesteps, seeds = plan.slots(1, slice(0, 10))
    assert timesteps.shape == (10, 5)
    assert timesteps[:, 1:].tolist() == [[1, 333, 666, 999]] * 10
    later_t, later_s = plan.slots(1, slice(5, 10))
    assert torch.equal(later_t, timesteps[5:])
    assert torch.equal(later_s, seeds[5:])
    assert len(set(seeds[:, 1:].flatten().tolist())) == 40


def test_a_checkpoint_without_a_record_indexes_and_answers(replay_run, digits) -> None:
    folder = replay_run.checkpoints()[-1].path
    spec = IndexSpec(
        dataset=DIGITS,
        checkpoints=(CheckpointSpec(path=folder, weight=0.5),),
        loss="l1",
        slots=SlotSpec(replay=False, random=2, seed=9),
        projector=ProjectorSpec(kind="sketch", dim=256),
    )
    plan = IndexPlan.resolve(spec)
    assert plan.weights == [0.5]
    assert plan.run is None
    results = Attributor(plan).attribute(digits.images[:1], QuerySpec(timesteps=4, draws=1), top_k=3)
    assert [len(results[0].methods[m].proponents) for m in ("tracin", "retrac")] == [3, 3]
    assert all(len(i.timesteps) == 2 for i in results[0].methods["retrac"].proponents)
