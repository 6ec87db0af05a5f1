"""The scan of rows stored in float32, bfloat16 and float16 against a float64 brute force.

Both estimators, both methods, proponents and opponents, several chunks, one and two checkpoints, one
and several slots, one and 16 queries. The brute force multiplies the stored rows (already rounded to
their format) with the float32 query vectors, in float64, and bounds what the scan may differ by:
float32 accumulation of k terms, the float32 means, norms, weights and sums after it and, for bfloat16
rows, the query side rounded to bfloat16 and each product rounded to bfloat16 (`BFLOAT16_ROUNDOFF`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from retrac import scoring
from retrac.query_side import BANDS, QueryVectors
from retrac.scoring import Ranked, RowChunk, scan
from tests.tolerances import BFLOAT16_ROUNDOFF, gamma

ROWS, DIM, TIMESTEPS, TOP_K, CHUNK = 300, 256, 3, 5, 64
WEIGHTS = (0.75, 1.5)


@dataclass(frozen=True)
class Truth:
    """Float64 parts `(n, Q, C, B)` per method and their error bounds, same shape."""

    parts: dict[str, torch.Tensor]
    bounds: dict[str, torch.Tensor]


def stored_rows(dtype: torch.dtype, slots: int, checkpoints: int) -> list[RowChunk]:
    """Rows whose norms spread over orders of magnitude (as the timestep makes them), one of them zero
    (no direction: ReTrac scores it 0), rounded to `dtype`; norms are the stored rows' exact norms."""
    generator = torch.Generator().manual_seed(slots * 10 + checkpoints)
    out = []
    for _ in range(checkpoints):
        scale = torch.exp(torch.randn(ROWS, slots, 1, generator=generator))
        projected = (torch.randn(ROWS, slots, DIM, generator=generator) * scale).to(dtype)
        projected[7] = 0
        out.append(RowChunk(projected, projected.double().norm(dim=-1).float()))
    return out


def query_side(count: int, checkpoints: int) -> list[QueryVectors]:
    generator = torch.Generator().manual_seed(count)
    return [
        QueryVectors(
            per_timestep=torch.randn(count, TIMESTEPS, DIM, generator=generator),
            timestep_norms=torch.rand(count, TIMESTEPS, generator=generator) + 0.5,
            bands=torch.arange(TIMESTEPS) % len(BANDS),
        )
        for _ in range(checkpoints)
    ]


def brute_force(chunks: list[RowChunk], queries: list[QueryVectors], matched: bool) -> Truth:
    """Parts from the definitions: the paper's `mean_s g_s . (1/K) sum_{t in b} v_t`, the matched
    `(1/K) sum_{t in b} g_t . v_t`, ReTrac with `g / ||g||` (0 for a zero row) and v = `P h / ||h||`."""
    parts: dict[str, list[torch.Tensor]] = {"tracin": [], "retrac": []}
    bounds: dict[str, list[torch.Tensor]] = {"tracin": [], "retrac": []}
    bfloat16 = chunks[0].projected.dtype == torch.bfloat16
    rounding = BFLOAT16_ROUNDOFF if bfloat16 else 0.0
    slots = chunks[0].projected.shape[1]
    # float32 sums of k products, the query's float32 means over K (and bfloat16 rounding of it);
    # then float32 norm multiplies, slot means, band sums, weights and checkpoint sums.
    per_product = rounding + (1 + rounding) * gamma(DIM + TIMESTEPS) + rounding * gamma(DIM + TIMESTEPS)
    after = gamma(slots + TIMESTEPS + len(WEIGHTS) + 3)
    one_hot = torch.nn.functional.one_hot(queries[0].bands, len(BANDS)).double()  # (K, B)
    for chunk, query, weight in zip(chunks, queries, WEIGHTS[: len(chunks)], strict=True):
        rows = chunk.projected.double()  # (n, S, k)
        norms = chunk.norms.double()
        for method in ("tracin", "retrac"):
            vectors = query.timestep_vectors(method).double()  # (Q, K, k)
            scale = torch.where(norms > 0, 1 / norms, 0.0) if method == "retrac" else torch.ones_like(norms)
            products = torch.einsum("nsd,qtd->nsqt", rows, vectors) * scale[:, :, None, None]
            magnitudes = torch.einsum("nsd,qtd->nsqt", rows.abs(), vectors.abs()) * scale[:, :, None, None]
            if matched:  # slot t pairs with timestep t
                products, magnitudes = (
                    x.diagonal(dim1=1, dim2=3).unsqueeze(1) for x in (products, magnitudes)
                )
            error = (rounding + after) * products.abs() + per_product * magnitudes
            mean = (
                products.shape[1] * TIMESTEPS
            )  # the paper's mean over slots and timesteps, the matched one's over K
            parts[method].append(weight * torch.einsum("nsqt,tb->nqb", products, one_hot) / mean)
            bounds[method].append(weight * torch.einsum("nsqt,tb->nqb", error, one_hot) / mean)
    return Truth(
        parts={m: torch.stack(p, dim=2) for m, p in parts.items()},
        bounds={m: torch.stack(b, dim=2) for m, b in bounds.items()},
    )


def check_side(ranked: Ranked, truth: torch.Tensor, bound: torch.Tensor, largest: bool) -> None:
    """`ranked` is a top-k (bottom-k) of the true scores up to their errors; its scores,
    contributions and band parts are the true ones within their bounds."""
    scores, score_bound = truth.sum(dim=(2, 3)).T, bound.sum(dim=(2, 3)).T  # (Q, n)
    sign = 1 if largest else -1
    slack = 2 * score_bound.max(dim=1).values
    for q in range(scores.shape[0]):
        rows = ranked.rows[q]
        assert len(set(rows.tolist())) == TOP_K
        ordered = (sign * scores[q]).sort(descending=True).values
        kth, next_one = ordered[TOP_K - 1], ordered[TOP_K]
        assert ((sign * scores[q, rows]) >= kth - slack[q]).all()  # nothing below the k-th, up to errors
        clear = (sign * scores[q]) > next_one + slack[q]  # rows that no error can push out
        assert set(clear.nonzero().flatten().tolist()) <= set(rows.tolist())
        assert ((sign * ranked.scores[q]).diff() <= 0).all()  # best first
        assert ((ranked.scores[q].double() - scores[q, rows]).abs() <= score_bound[q, rows]).all()
        per_checkpoint = truth[rows, q].sum(dim=-1)
        assert ((ranked.contributions[q].double() - per_checkpoint).abs() <= bound[rows, q].sum(dim=-1)).all()
        per_band = truth[rows, q].sum(dim=1)
        assert ((ranked.bands[q].double() - per_band).abs() <= bound[rows, q].sum(dim=1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("estimator", "slots", "checkpoints"),
    [("paper", 1, 1), ("paper", 3, 2), ("matched", TIMESTEPS, 1), ("matched", TIMESTEPS, 2)],
)
@pytest.mark.parametrize("count", [1, 16])
def test_scan_of_each_format_equals_float64_brute_force(
    dtype: torch.dtype, estimator: str, slots: int, checkpoints: int, count: int, monkeypatch
) -> None:
    monkeypatch.setattr(scoring, "SCAN_BLOCK_BYTES", 16 * DIM * 4)  # float16 chunks in several blocks
    chunks = stored_rows(dtype, slots, checkpoints)
    queries = query_side(count, checkpoints)
    matched = slice(0, TIMESTEPS) if estimator == "matched" else None

    def chunked():
        for start in range(0, ROWS, CHUNK):
            yield (start, [RowChunk(c.projected[start : start + CHUNK],
                                    c.norms[start : start + CHUNK]) for c in chunks])

    ranking = scan(chunked(), queries, WEIGHTS[:checkpoints], top_k=TOP_K, matched=matched)
    truth = brute_force(chunks, queries, matched is not None)
    for method in ("tracin", "retrac"):
        check_side(ranking.proponents[method], truth.parts[method], truth.bounds[method], largest=True)
        check_side(ranking.opponents[method], truth.parts[method], truth.bounds[method], largest=False)


def test_the_checks_catch_a_wrong_answer() -> None:
    """Scores off by 0.1%, a row swapped for the next one: the float32 bounds refuse both."""
    chunks = stored_rows(torch.float32, 3, 2)
    queries = query_side(16, 2)
    ranking = scan([(0, chunks)], queries, WEIGHTS, top_k=TOP_K)
    truth = brute_force(chunks, queries, matched=False)
    ranked, parts, bounds = ranking.proponents["tracin"], truth.parts["tracin"], truth.bounds["tracin"]
    check_side(ranked, parts, bounds, largest=True)
    for wrong in (
        replace(ranked, scores=ranked.scores * 1.001),
        replace(ranked, rows=(ranked.rows + 1) % ROWS),
    ):
        with pytest.raises(AssertionError):
            check_side(wrong, parts, bounds, largest=True)
