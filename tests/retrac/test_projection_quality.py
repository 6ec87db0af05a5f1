"""Projected (sparse sketch, k = 4096) scores against exact ones on the same trained model."""

from __future__ import annotations

import torch
from scipy.stats import spearmanr

from api_schemas import QuerySpec
from retrac.attribution import Attributor
from retrac.plan import IndexPlan
from tests.retrac.conftest import index_spec
from tests.retrac.test_scores_exact import engine_scores

MIN_SPEARMAN = 0.9


def scores_with(run, digits, kind: str, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    plan = IndexPlan.resolve(index_spec(run, kind=kind, dim=4096))
    results = Attributor(plan).attribute(queries, QuerySpec(timesteps=8, draws=2, seed=1), top_k=len(digits))
    return {m: engine_scores(results, digits.ids, m) for m in ("tracin", "retrac")}


def test_sketch_scores_rank_like_exact_scores(replay_run, digits) -> None:
    queries = digits.images[[0, 5, 9, 14]]
    exact = scores_with(replay_run, digits, "identity", queries)
    sketched = scores_with(replay_run, digits, "sketch", queries)
    for method in ("tracin", "retrac"):
        for q in range(queries.shape[0]):
            rho = spearmanr(exact[method][:, q], sketched[method][:, q]).statistic
            top_exact = set(exact[method][:, q].topk(10).indices.tolist())
            top_sketch = set(sketched[method][:, q].topk(10).indices.tolist())
            print(f"{method} query {q}: spearman {rho:.4f}, top-10 overlap {len(top_exact & top_sketch)}/10")
            assert rho >= MIN_SPEARMAN
