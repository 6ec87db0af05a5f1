"""ReTrac is blind to a training gradient's magnitude; TracIn is not (method.md section 5)."""

from __future__ import annotations

import torch

from api_schemas import QuerySpec
from retrac.attribution import Attributor, MemoryRows
from retrac.plan import IndexPlan, Rows
from retrac.scoring import scan
from tests.retrac.conftest import index_spec

SCALE, SAMPLE = 25.0, 4


def full_scores(attributor: Attributor, rows: list[Rows], queries) -> dict[str, torch.Tensor]:
    n = rows[0].norms.shape[0]
    source = MemoryRows(attributor.plan.spec, rows, attributor.plan.weights, attributor.plan.dataset.ids)
    ranking = scan(source.chunks(range(len(rows)), 7), queries, attributor.plan.weights, top_k=n)
    out = {}
    for method, ranked in ranking.proponents.items():
        table = torch.zeros(n, ranked.rows.shape[0])
        table.scatter_(0, ranked.rows.T, ranked.scores.T)
        out[method] = table
    return out


def test_scaling_one_gradient_changes_tracin_only(replay_run, digits) -> None:
    attributor = Attributor(IndexPlan.resolve(index_spec(replay_run, kind="sketch", dim=1024)))
    rows = attributor.index()
    queries = attributor.query_vectors(digits.images[[1, 2, 3]], QuerySpec(timesteps=5, draws=2), [0, 1])
    before = full_scores(attributor, rows, queries)
    scaled = []
    for r in rows:
        factor = torch.ones(r.norms.shape[0])
        factor[SAMPLE] = SCALE
        scaled.append(
            Rows(r.projected * factor[:, None, None], r.norms * factor[:, None], r.timesteps, r.seeds)
        )
    after = full_scores(attributor, scaled, queries)
    torch.testing.assert_close(after["retrac"], before["retrac"], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(after["tracin"][SAMPLE], SCALE * before["tracin"][SAMPLE], rtol=1e-5, atol=0)
    others = [i for i in range(len(digits)) if i != SAMPLE]
    torch.testing.assert_close(after["tracin"][others], before["tracin"][others])
    assert not torch.allclose(after["tracin"], before["tracin"])
