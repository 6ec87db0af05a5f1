"""Self-influence from stored slots, and checkpoints trained elsewhere (no replay record)."""

from __future__ import annotations

import torch

from api_schemas import CheckpointSpec, IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.gradients import loop_gradients
from retrac.plan import IndexPlan
from retrac.noise import noise_from_seeds
from retrac.scoring import self_influence
from tests.retrac.conftest import DIGITS, index_spec


def test_self_influence_from_slots_equals_reference_dot_products(replay_run, digits) -> None:
    plan = IndexPlan.resolve(index_spec(replay_run, kind="identity", grid=3))
    rows = Attributor(plan).index()
    got = self_influence(rows, plan.weights, train_slots=[0], query_slots=[1, 2, 3])
    expected = {"tracin": torch.zeros(len(digits)), "retrac": torch.zeros(len(digits))}
    for c, weight in enumerate(plan.weights):
        model = plan.load_model(c)
        timesteps, seeds = plan.slots(c, slice(0, len(digits)))
        for n in range(len(digits)):
            noise = noise_from_seeds(seeds[n], digits.images.shape[1:]).unsqueeze(1)
            g = loop_gradients(model, "l1", digits.images[n].expand(4, -1, -1, -1), timesteps[n], noise)
            expected["tracin"][n] += weight * (g[0] @ g[1:].mean(0))
            expected["retrac"][n] += weight * (g[0] / g[0].norm()) @ (g[1:] / g[1:].norm(dim=1, keepdim=True)).mean(0)
    for method in ("tracin", "retrac"):
        torch.testing.assert_close(got[method], expected[method], rtol=1e-4, atol=1e-6 * float(expected[method].abs().max()))


def test_grid_slots_are_the_query_grid_and_independent_of_sharding(replay_run) -> None:
    plan = IndexPlan.resolve(index_spec(replay_run, grid=4))
    timesteps, seeds = plan.slots(1, slice(0, 10))
    assert timesteps.shape == (10, 5)
    assert timesteps[:, 1:].tolist() == [[1, 333, 666, 999]] * 10
    later_t, later_s = plan.slots(1, slice(5, 10))
    assert torch.equal(later_t, timesteps[5:]) and torch.equal(later_s, seeds[5:])
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
    assert plan.weights == [0.5] and plan.run is None
    results = Attributor(plan).attribute(digits.images[:1], QuerySpec(timesteps=4, draws=1), top_k=3)
    assert [len(results[0].methods[m].proponents) for m in ("tracin", "retrac")] == [3, 3]
    assert all(len(i.timesteps) == 2 for i in results[0].methods["retrac"].proponents)
