"""Diffusion-TracIn and Diffusion-ReTrac scores, streamed over chunks of training rows.

With per-checkpoint weights `w_c`, projected training gradients `g_c(z, s)` of slot s and exact
norms `||g_c(z, s)||` (method.md section 4), the paper's estimator:

    TracIn(z, q) = sum_c w_c * mean_s g_c(z, s) . G_c(q)
    ReTrac(z, q) = sum_c w_c * mean_s (g_c(z, s) / ||g_c(z, s)||) . G^_c(q)

and the matched one, over the K shared-noise grid slots `g_c(z, t)` (slot t holds the gradient at the
query's own timestep t and noise):

    TracIn(z, q) = sum_c w_c * (1/K) sum_t g_c(z, t) . P h_c(q, t)
    ReTrac(z, q) = sum_c w_c * (1/K) sum_t g_c(z, t) / ||g_c(z, t)|| . P h_c(q, t) / ||h_c(q, t)||

Either score splits into parts per checkpoint and timestep band (`retrac.query_side.BANDS`), which
sum to it. `scan` keeps the top-k (proponents) and bottom-k (opponents) per method and query, with
their parts, over any number of chunks in memory bounded by the chunk size; the band parts are
computed for each chunk's best k alone. The in-memory engine and the Zarr store feed it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import partial

import torch

from api_schemas import Method, SlotSpec
from retrac.exceptions import SpecError
from retrac.gradients import inverse_norms
from retrac.query_side import QueryVectors

METHODS: tuple[Method, ...] = ("tracin", "retrac")

SCAN_ROWS = 4096
"""Training rows per scan step (in memory or read from a store): bounds a scan's working memory at
SCAN_ROWS * S * k values per checkpoint, beyond what a store keeps resident."""

SCAN_BLOCK_BYTES = 1 << 20
"""float32 bytes a scan converts at a time from float16 rows: the block stays in the core's L2 cache
between its conversion and its matmul. (One thread, k = 4,096, one query: 512-row blocks, 8 MB, ran
at 0.3x of a plain sum over the same float16 bytes, 32- and 64-row ones, 0.5-1 MB, at 0.5-0.8x in
runs on a shared machine. A direct float16 matmul rounds scores to float16; a float32 copy of a whole
chunk costs extra passes over memory.)"""


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


def matched_slots(slots: SlotSpec) -> slice:
    """The stored slots the matched estimator reads: the shared-noise grid slots, in grid order
    (slot order is the replayed step, then grid, then random slots)."""
    if slots.noise != "shared":
        raise SpecError("the matched estimator needs shared-noise grid slots; this index has none")
    return slice(int(slots.replay), int(slots.replay) + slots.grid)


def _blocks(projected: torch.Tensor, slots: slice) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block `(b, S', k)` of `projected[rows, slots]`) in a dtype the matmul takes as it is.

    float32 and bfloat16 rows come as one view of the whole chunk, uncopied (bfloat16 through the
    CPU's bf16 matmul: AVX-512 BF16 or AMX, float32 accumulation, products rounded to bfloat16);
    float16 rows are converted to float32 `SCAN_BLOCK_BYTES` at a time through one reused buffer.
    """
    if projected.dtype in (torch.float32, torch.bfloat16):
        yield 0, projected[:, slots]
        return
    n = projected.shape[0]
    width = len(range(*slots.indices(projected.shape[1])))
    step = max(1, SCAN_BLOCK_BYTES // (width * projected.shape[2] * 4))
    buffer = torch.empty(min(step, n), width, projected.shape[2], device=projected.device)
    for start in range(0, n, step):
        part = projected[start : start + step, slots]
        converted = buffer[: part.shape[0]]
        converted.copy_(part)
        yield start, converted


def _products(block: torch.Tensor, sides: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`(b * S, m)` float32 (into `out` if given): every stored row of `block` `(b, S, k)` times every
    column of `sides` `(m, k)` float32, in the block's dtype (the query side rounded to bfloat16 for
    bfloat16 rows)."""
    rows = block.reshape(-1, block.shape[-1])
    if block.dtype != torch.float32:
        products = torch.mm(rows, sides.to(block.dtype).T).float()
        return products if out is None else out.copy_(products)
    return torch.mm(rows, sides.T) if out is None else torch.mm(rows, sides.T, out=out)


def _paper_parts(chunk: RowChunk, query: QueryVectors, methods: Sequence[Method]) -> dict[Method, torch.Tensor]:
    """`(n, Q, B)` per method: `mean_s g_s . G_b` (ReTrac: `g_s / ||g_s||`), G_b band b's part of G.

    The slot mean is taken after the product (`mean_s(g_s) . G = mean_s(g_s . G)`) and ReTrac's
    `1 / ||g_s||` per slot: the numbers of `slot_means(chunk) @ query`, one matmul for every method.
    """
    n, slots, dim = chunk.projected.shape
    device = chunk.projected.device
    sides = torch.stack([query.band_vectors(m) for m in methods]).to(device, torch.float32)  # (methods, Q, B, k)
    shape = sides.shape[1:3]
    sides = sides.reshape(-1, dim)
    inverse = inverse_norms(chunk.norms.to(device))
    out = {m: torch.empty(n, *shape, device=device) for m in methods}
    for start, block in _blocks(chunk.projected, slice(None)):
        rows = slice(start, start + block.shape[0])
        products = _products(block, sides).view(block.shape[0], slots, len(methods), *shape)
        for i, method in enumerate(methods):
            per_slot = products[:, :, i]
            if method == "retrac":
                per_slot = per_slot * inverse[rows, :, None, None]
            out[method][rows] = per_slot.mean(dim=1)
    return out


def _matched_parts(
    chunk: RowChunk, query: QueryVectors, methods: Sequence[Method], grid: slice
) -> dict[Method, torch.Tensor]:
    """`(n, Q, B)` per method: `(1/K) sum_{t in b} g_t . P h(q, t)` over the grid slots `grid`
    (ReTrac: both sides divided by their exact norms), slot t paired with query timestep t."""
    n, _, dim = chunk.projected.shape
    device = chunk.projected.device
    per_timestep = torch.stack([query.timestep_vectors(m) for m in methods]).to(device, torch.float32)
    _, count, k_steps, _ = per_timestep.shape  # (methods, Q, K, k)
    sides = per_timestep.permute(2, 0, 1, 3).reshape(k_steps, -1, dim)  # (K, methods * Q, k)
    bands = query.band_weights().to(device)
    inverse = inverse_norms(chunk.norms[:, grid].to(device))
    out = {m: torch.empty(n, count, bands.shape[1], device=device) for m in methods}
    for start, block in _blocks(chunk.projected, grid):
        rows = slice(start, start + block.shape[0])
        products = torch.einsum("nkd,kmd->nkm", block, sides.to(block.dtype)).float()
        products = products.view(block.shape[0], k_steps, len(methods), count)
        for i, method in enumerate(methods):
            per_slot = products[:, :, i]
            if method == "retrac":
                per_slot = per_slot * inverse[rows, :, None]
            out[method][rows] = torch.einsum("nkq,kb->nqb", per_slot, bands)
    return out


def _paper_scores(chunk: RowChunk, query: QueryVectors, methods: Sequence[Method]) -> dict[Method, torch.Tensor]:
    """`(n, Q)` per method: `mean_s g_s . G` (ReTrac: `g_s / ||g_s||` and G^), without band parts.

    One pass over the stored rows: each block (`_blocks`) is multiplied with the query vectors of
    every method at once (two columns per query: a third of `_paper_parts`' matmul, the cost of a
    scan), into one table of the chunk's products; slot means and norms are then taken over the whole
    table, so that a block costs its conversion and its matmul alone.
    """
    n, slots, _ = chunk.projected.shape
    device = chunk.projected.device
    sides = torch.cat([getattr(query, m).to(device, torch.float32) for m in methods])  # (methods * Q, k)
    products = torch.empty(n * slots, sides.shape[0], device=device)
    for start, block in _blocks(chunk.projected, slice(None)):
        _products(block, sides, products[start * slots : (start + block.shape[0]) * slots])
    table = products.view(n, slots, len(methods), -1)
    inverse = inverse_norms(chunk.norms.to(device))
    out = {}
    for i, method in enumerate(methods):
        per_slot = table[:, :, i]
        if method == "retrac":
            per_slot = per_slot * inverse[:, :, None]
        out[method] = per_slot.mean(dim=1)
    return out


def _check_pairing(chunk: RowChunk, query: QueryVectors, matched: slice) -> None:
    """A SpecError unless the grid slots `matched` are as many as the query's timesteps."""
    stored, asked = len(range(*matched.indices(chunk.projected.shape[1]))), query.per_timestep.shape[1]
    if stored != asked:
        raise SpecError(f"the matched estimator pairs each of {stored} grid slots with a query timestep; got K = {asked}")


def parts(
    chunks: Sequence[RowChunk],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    methods: Sequence[Method],
    matched: slice | None = None,
) -> dict[Method, torch.Tensor]:
    """Weighted score parts `(n, Q, C, B)` per method, per checkpoint and timestep band; a score is
    their sum. `matched` None: the paper's estimator over every slot; else the matched estimator over
    the grid slots `matched` (`matched_slots`), which must hold the query's K timesteps in order."""
    out: dict[Method, list[torch.Tensor]] = {m: [] for m in methods}
    for chunk, query, weight in zip(chunks, queries, weights, strict=True):
        if matched is None:
            table = _paper_parts(chunk, query, methods)
        else:
            _check_pairing(chunk, query, matched)
            table = _matched_parts(chunk, query, methods, matched)
        for method in methods:
            out[method].append(weight * table[method])
    return {m: torch.stack(p, dim=2) for m, p in out.items()}


def contributions(
    chunks: Sequence[RowChunk],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    methods: Sequence[Method],
    matched: slice | None = None,
) -> dict[Method, torch.Tensor]:
    """Per-checkpoint weighted contributions `(n, Q, C)` per method (estimator as in `parts`); scores
    are their sum over C. The paper's estimator skips the band split (a scan's matmul is its cost);
    the matched one has it for free (its per-timestep products are needed anyway)."""
    if matched is not None:
        return {m: table.sum(dim=-1) for m, table in parts(chunks, queries, weights, methods, matched).items()}
    out: dict[Method, list[torch.Tensor]] = {m: [] for m in methods}
    for chunk, query, weight in zip(chunks, queries, weights, strict=True):
        table = _paper_scores(chunk, query, methods)
        for method in methods:
            out[method].append(weight * table[method])
    return {m: torch.stack(p, dim=-1) for m, p in out.items()}


def _band_parts(
    chunks: Sequence[RowChunk],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    method: Method,
    matched: slice | None,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Band parts `(Q, k, B)` of the rows `rows` `(Q, k)` (positions in `chunks`) for their own query."""
    count, kept = rows.shape
    flat = rows.reshape(-1)
    subset = [RowChunk(c.projected[flat], c.norms[flat]) for c in chunks]
    table = parts(subset, queries, weights, [method], matched)[method]  # (Q * k, Q, C, B)
    table = table.view(count, kept, count, *table.shape[2:])
    own = torch.arange(count)
    return table[own, :, own].sum(dim=2)


@dataclass(frozen=True)
class Ranked:
    """k rows per query: `rows` `(Q, k)` int64 row numbers, `scores` `(Q, k)`, their parts per
    checkpoint `contributions` `(Q, k, C)` and per timestep band `bands` `(Q, k, B)`."""

    rows: torch.Tensor
    scores: torch.Tensor
    contributions: torch.Tensor
    bands: torch.Tensor


@dataclass(frozen=True)
class Ranking:
    """Proponents (highest first) and opponents (lowest first) per method."""

    proponents: dict[Method, Ranked]
    opponents: dict[Method, Ranked]


_RANKED = tuple(f.name for f in fields(Ranked))


class _Extremes:
    """Running top-k of one score table across chunks (`largest=False` keeps the bottom k)."""

    def __init__(self, top_k: int, largest: bool) -> None:
        self.top_k, self.largest = top_k, largest
        self.best: Ranked | None = None

    def add(
        self, first_row: int, contribution: torch.Tensor, band_parts: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Merge rows `first_row..` with contributions `(n, Q, C)` into the kept k; `band_parts`
        gives the band parts `(Q, k, B)` of chunk rows `(Q, k)`, asked for this chunk's best k only."""
        scores = contribution.sum(dim=-1).T  # (Q, n)
        local = scores.topk(min(self.top_k, scores.shape[1]), dim=1, largest=self.largest, sorted=True).indices
        per_checkpoint = contribution.permute(1, 0, 2)  # (Q, n, C)
        candidates = Ranked(
            rows=local + first_row, scores=scores.gather(1, local),
            contributions=per_checkpoint.gather(1, local.unsqueeze(-1).expand(-1, -1, per_checkpoint.shape[2])),
            bands=band_parts(local),
        )
        if self.best is not None:
            candidates = Ranked(*(torch.cat([getattr(self.best, f), getattr(candidates, f)], dim=1) for f in _RANKED))
        kept = candidates.scores.topk(min(self.top_k, candidates.scores.shape[1]), dim=1, largest=self.largest).indices

        def gathered(values: torch.Tensor) -> torch.Tensor:
            index = kept if values.ndim == 2 else kept.unsqueeze(-1).expand(-1, -1, values.shape[2])
            return values.gather(1, index)

        self.best = Ranked(*(gathered(getattr(candidates, f)) for f in _RANKED))


def scan(
    chunks: Iterable[tuple[int, Sequence[RowChunk]]],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    *,
    top_k: int,
    methods: Sequence[Method] = METHODS,
    matched: slice | None = None,
) -> Ranking:
    """Rank all rows for every query. `chunks` yields (first row, one RowChunk per checkpoint);
    `matched` picks the estimator as in `parts`."""
    keep = {(m, largest): _Extremes(top_k, largest) for m in methods for largest in (True, False)}
    for first_row, per_checkpoint in chunks:
        table = contributions(per_checkpoint, queries, weights, methods, matched)
        for (method, _), extremes in keep.items():
            bands = partial(_band_parts, per_checkpoint, queries, weights, method, matched)
            extremes.add(first_row, table[method], bands)
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
