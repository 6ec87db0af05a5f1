"""`score_every_row` gives the numbers `attribute` ranks: every method and estimator, on loss and
output-norm rows with the kernel, against the scores and per-checkpoint contributions that `attribute`
reports for every sample (top_k = N)."""

from __future__ import annotations

import pytest
import torch

from api_schemas import DatasetSpec, IndexSpec, KernelSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.exceptions import SpecError
from retrac.methods import methods_served
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun
from tests.tolerances import gamma

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["loss", "output-norm"])
def attributor(request: pytest.FixtureRequest, tiny_run: TrainingRun) -> Attributor:
    spec = IndexSpec(
        dataset=DatasetSpec(source="builtin:digits", resolution=8, limit=48),
        run=str(tiny_run.folder),
        slots=SlotSpec(replay=True, grid=3, noise="shared", draws=1, seed=2),
        projector=ProjectorSpec(kind="sketch", dim=64, seed=1),
        output_function=request.param,
        kernel=KernelSpec(),
        shard_size=16,
    )
    found = Attributor(IndexPlan.resolve(spec))
    found.index()
    return found


@pytest.mark.parametrize("estimator", ["paper", "matched"])
def test_every_row_scores_are_the_ranked_scores(attributor: Attributor, estimator: str) -> None:
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    query = QuerySpec(timesteps=3, draws=1, seed=2, estimator=estimator)
    methods = methods_served(attributor.plan.spec)
    every = attributor.score_every_row(images, query, methods=methods)
    ranked = attributor.attribute(images, query, top_k=48, methods=methods)
    position = {sample_id: i for i, sample_id in enumerate(attributor.plan.dataset.ids)}
    for method in methods:
        assert every[method].shape == (3, 48)
        for q, result in enumerate(ranked):
            entries = result.methods[method].proponents
            assert sorted(position[e.sample_id] for e in entries) == list(range(48))
            for entry in entries:
                # Both sum the same three float32 contributions; a ranked score may add them in another order.
                bound = gamma(3) * sum(abs(c) for c in entry.contributions)
                assert float(every[method][q, position[entry.sample_id]]) == pytest.approx(
                    entry.score, abs=bound
                )


def test_every_row_scores_refuse_what_attribute_refuses(attributor: Attributor) -> None:
    images = torch.rand(1, 1, 8, 8) * 2 - 1
    served = methods_served(attributor.plan.spec)
    with pytest.raises(SpecError, match="search exact"):
        attributor.score_every_row(images, QuerySpec(search="approximate"), methods=served)
    with pytest.raises(SpecError, match=r"query images must be"):
        attributor.score_every_row(torch.rand(1, 1, 4, 4), QuerySpec(timesteps=3, draws=1), methods=served)
    other = "dtrak" if attributor.plan.spec.output_function == "loss" else "tracin"
    with pytest.raises(SpecError, match="output-function"):
        attributor.score_every_row(images, QuerySpec(timesteps=3, draws=1), methods=[other])
