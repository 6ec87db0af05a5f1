"""Scores of rows as wide as the identity projector's, accumulated to float64 level (`WIDE_ROWS`).

A float32 dot product of 300,000 positive terms errs by ~1e-4 of its value; the scan's float64
accumulation must meet the float64 bound on the same float32 rows, under both estimators.
"""

from __future__ import annotations

import torch

from retrac.query_side import WIDE_ROWS, QueryVectors
from retrac.scoring import RowChunk, contributions, scan

WIDTH, SAMPLES, STEPS = 300_000, 3, 2

FLOAT64_BOUND = WIDTH * 2.0**-53 * 4
"""gamma_n of float64 over the WIDTH products, with room for the slot and timestep means (Higham 3.5)."""


def test_self_scores_of_wide_rows_are_float64_exact() -> None:
    assert WIDTH > WIDE_ROWS
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(SAMPLES, STEPS, WIDTH, generator=generator)  # positive: no cancellation to hide behind
    norms = rows.double().norm(dim=-1).float()
    chunk = RowChunk(rows, norms)
    query = QueryVectors(per_timestep=rows, timestep_norms=norms, bands=torch.zeros(STEPS, dtype=torch.int64))
    exact = rows.double()
    expected = {  # (N, Q): mean over slots . mean over timesteps; matched: the mean of per-timestep products
        "paper": torch.einsum("nsd,qtd->nq", exact, exact) / STEPS**2,
        "matched": torch.einsum("nsd,qsd->nq", exact, exact) / STEPS,
    }
    for estimator, matched in (("paper", None), ("matched", slice(0, STEPS))):
        got = contributions([chunk], [query], [1.0], ["tracin"], matched)["tracin"][..., 0]
        error = float(((got.double() - expected[estimator]).abs() / expected[estimator]).max())
        assert error <= FLOAT64_BOUND, (estimator, error)
        ranked = scan([(0, [chunk])], [query], [1.0], top_k=1, methods=["tracin"], matched=matched)
        assert ranked.proponents["tracin"].rows[:, 0].tolist() == expected[estimator].argmax(dim=0).tolist()
