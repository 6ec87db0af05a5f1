"""Diffusion-TracIn and Diffusion-ReTrac scores, streamed over chunks of training rows.

With per-checkpoint weights `w_c`, projected training gradients `g_c(z, s)` of slot s and exact
norms `||g_c(z, s)||` (method.md section 4):

    TracIn(z, q) = sum_c w_c * mean_s g_c(z, s) . G_c(q)
    ReTrac(z, q) = sum_c w_c * mean_s (g_c(z, s) / ||g_c(z, s)||) . G^_c(q)

`scan` keeps the top-k (proponents) and bottom-k (opponents) per method and query, with each one's
per-checkpoint contributions, over any number of chunks in memory bounded by the chunk size. The
in-memory engine and the Zarr store feed it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from api_schemas import Method
from retrac.exceptions import SpecError
from retrac.gradients import inverse_norms
from retrac.query_side import QueryVectors

METHODS: tuple[Method, ...] = ("tracin", "retrac")

SCAN_ROWS = 4096
"""Training rows per scan step (in memory or read from a store): bounds a scan's working memory at
SCAN_ROWS * S * k values per checkpoint, beyond what a store keeps resident."""

SCAN_BLOCK = 512
"""Rows converted to float32 at a time by `contributions`: the block stays in cache between its
conversion and its matmul. (A direct float16 matmul rounds scores to ~1e-3; a float32 copy of a
whole chunk costs extra passes over memory.)"""


@dataclass(frozen=True)
class RowChunk:
    """Stored rows of one checkpoint: `projected` `(n, S, k)`, exact `norms` `(n, S)`."""

    projected: torch.Tensor
    norms: torch.Tensor


def slot_means(chunk: RowChunk) -> dict[Method, torch.Tensor]:
    """Training-side vectors `(n, k)` float32: the slot mean of g (TracIn) and of g/||g|| (ReTrac).

    A zero gradient has no direction; its ReTrac vector is zero rather than NaN (`inverse_norms`).
    """
    projected = chunk.projected.float()
    inverse = inverse_norms(chunk.norms)
    return {"tracin": projected.mean(dim=1), "retrac": (projected * inverse.unsqueeze(-1)).mean(dim=1)}


def contributions(
    chunks: Sequence[RowChunk], queries: Sequence[QueryVectors], weights: Sequence[float], methods: Sequence[Method]
) -> dict[Method, torch.Tensor]:
    """Per-checkpoint weighted contributions `(n, Q, C)` per method; scores are their sum over C.

    One pass over the stored rows: blocks of `SCAN_BLOCK` rows are converted to float32 once and
    multiplied with the query vectors of every method at once. The slot mean is taken after the
    product (`mean_s(g_s) . G = mean_s(g_s . G)`), and ReTrac's `1 / ||g_s||` is applied per slot:
    the numbers of `slot_means(chunk) @ query`, without copying the rows per method.
    """
    out: dict[Method, list[torch.Tensor]] = {m: [] for m in methods}
    for chunk, query, weight in zip(chunks, queries, weights, strict=True):
        n, slots, dim = chunk.projected.shape
        device = chunk.projected.device
        sides = torch.cat([getattr(query, m).to(device, torch.float32) for m in methods])  # (methods * Q, k)
        rows = chunk.projected.reshape(n * slots, dim)
        products = torch.empty(n * slots, sides.shape[0], device=device)
        step = SCAN_BLOCK * slots
        block = torch.empty(min(step, n * slots), dim, device=device)
        for start in range(0, n * slots, step):
            part = rows[start : start + step]
            converted = block[: part.shape[0]]
            converted.copy_(part)
            torch.mm(converted, sides.T, out=products[start : start + part.shape[0]])
        per_method = products.view(n, slots, len(methods), -1)  # (n, S, methods, Q)
        inverse = inverse_norms(chunk.norms.to(device))
        for i, method in enumerate(methods):
            per_slot = per_method[:, :, i]
            if method == "retrac":
                per_slot = per_slot * inverse.unsqueeze(-1)
            out[method].append(weight * per_slot.mean(dim=1))
    return {m: torch.stack(parts, dim=-1) for m, parts in out.items()}


@dataclass(frozen=True)
class Ranked:
    """k rows per query: `rows` `(Q, k)` int64 row numbers, `scores` `(Q, k)`, `contributions` `(Q, k, C)`."""

    rows: torch.Tensor
    scores: torch.Tensor
    contributions: torch.Tensor


@dataclass(frozen=True)
class Ranking:
    """Proponents (highest first) and opponents (lowest first) per method."""

    proponents: dict[Method, Ranked]
    opponents: dict[Method, Ranked]


class _Extremes:
    """Running top-k of one score table across chunks (`largest=False` keeps the bottom k)."""

    def __init__(self, top_k: int, largest: bool) -> None:
        self.top_k, self.largest = top_k, largest
        self.best: Ranked | None = None

    def add(self, first_row: int, contribution: torch.Tensor) -> None:
        scores = contribution.sum(dim=-1).T  # (Q, n)
        rows = torch.arange(first_row, first_row + scores.shape[1]).expand_as(scores)
        parts = contribution.permute(1, 0, 2)  # (Q, n, C)
        if self.best is not None:
            scores = torch.cat([self.best.scores, scores], dim=1)
            rows = torch.cat([self.best.rows, rows], dim=1)
            parts = torch.cat([self.best.contributions, parts], dim=1)
        k = min(self.top_k, scores.shape[1])
        kept = scores.topk(k, dim=1, largest=self.largest, sorted=True).indices
        self.best = Ranked(
            rows=rows.gather(1, kept),
            scores=scores.gather(1, kept),
            contributions=parts.gather(1, kept.unsqueeze(-1).expand(-1, -1, parts.shape[2])),
        )


def scan(
    chunks: Iterable[tuple[int, Sequence[RowChunk]]],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    *,
    top_k: int,
    methods: Sequence[Method] = METHODS,
) -> Ranking:
    """Rank all rows for every query. `chunks` yields (first row, one RowChunk per checkpoint)."""
    keep = {(m, largest): _Extremes(top_k, largest) for m in methods for largest in (True, False)}
    for first_row, per_checkpoint in chunks:
        table = contributions(per_checkpoint, queries, weights, methods)
        for (method, _), extremes in keep.items():
            extremes.add(first_row, table[method])
    if any(e.best is None for e in keep.values()):
        raise ValueError("scan needs at least one row")
    return Ranking(
        proponents={m: keep[m, True].best for m in methods},  # type: ignore[misc]
        opponents={m: keep[m, False].best for m in methods},  # type: ignore[misc]
    )


def self_influence_slots(slot_kinds: Sequence[str]) -> tuple[list[int], list[int]]:
    """(training-side slots, query-side slots) of self-influence from stored slots (method.md section 4).

    The training side is the replayed slot (or, without one, every slot); the query side is the
    grid slots. A SpecError if there are none: the index needs grid slots.
    """
    query = [s for s, kind in enumerate(slot_kinds) if kind == "grid"]
    if not query:
        raise SpecError("self-influence from stored slots needs grid slots; create the index with grid > 0")
    train = [s for s, kind in enumerate(slot_kinds) if kind == "replay"] or list(range(len(slot_kinds)))
    return train, query


def self_influence(
    chunks: Sequence[RowChunk],
    weights: Sequence[float],
    train_slots: Sequence[int],
    query_slots: Sequence[int],
) -> dict[Method, torch.Tensor]:
    """Self-influence `(n,)` per method from stored slots alone (method.md section 4).

    The training side uses `train_slots` (the replayed step); the query side is the mean over
    `query_slots` (grid slots: the estimator with K = grid size and M = 1).
    """
    total: dict[Method, torch.Tensor] = {}
    for chunk, weight in zip(chunks, weights, strict=True):
        train = slot_means(RowChunk(chunk.projected[:, train_slots], chunk.norms[:, train_slots]))
        query = slot_means(RowChunk(chunk.projected[:, query_slots], chunk.norms[:, query_slots]))
        for method in METHODS:
            value = weight * (train[method] * query[method]).sum(dim=1)
            total[method] = total.get(method, 0) + value
    return total
