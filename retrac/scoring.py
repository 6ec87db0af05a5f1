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
computed for the rows that enter the kept k alone. The in-memory engine and the Zarr store feed it
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from api_schemas import Method, SlotSpec
from retrac.exceptions import SpecError
from retrac.gradients import inverse_norms
from retrac.query_side import QueryVectors, accumulator

METHODS: tuple[Method, ...] = ("tracin", "retrac")

SCAN_ROWS = 4096
"""Training rows per scan step (in memory or read from a store): bounds a scan's working memory at
SCAN_ROWS * S * k values per checkpoint, beyond what a store keeps resident."""

SCAN_BLOCK_BYTES = 1 << 20
"""float32 bytes a scan converts at a time from float16 rows: the block stays in the core's L2 cache
between its conversion and its matmul: larger blocks ran slower, a direct float16 matmul rounds
scores to float16, and a float32 copy of a whole chunk costs extra passes over memory (see
docs/performance.md#the-exact-scan-near-the-memory-limit)."""


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


def _blocks(projected: torch.Tensor, slots: slice, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block `(b, S', k)` of `projected[rows, slots]`) in a dtype the matmul takes as it is.

    `dtype` float32 (`accumulator`): float32 and bfloat16 rows come as one view of the whole chunk,
    uncopied (bfloat16 through the CPU's bf16 matmul: AVX-512 BF16 or AMX, float32 accumulation,
    products rounded to bfloat16); float16 rows are converted to float32 `SCAN_BLOCK_BYTES` at a time
    through one reused buffer. `dtype` float64: every row is converted so, to float64.
    """
    if dtype == torch.float32 and projected.dtype in (torch.float32, torch.bfloat16):
        yield 0, projected[:, slots]
        return
    n = projected.shape[0]
    width = len(range(*slots.indices(projected.shape[1])))
    size = torch.finfo(dtype).bits // 8
    step = max(1, SCAN_BLOCK_BYTES // (width * projected.shape[2] * size))
    buffer = torch.empty(min(step, n), width, projected.shape[2], device=projected.device, dtype=dtype)
    for start in range(0, n, step):
        part = projected[start : start + step, slots]
        converted = buffer[: part.shape[0]]
        converted.copy_(part)
        yield start, converted


_ONEDNN = torch.backends.mkldnn.is_available()
"""Whether this torch build has oneDNN (every x86-64 CPU wheel does): its float32 product is private API."""

BF16_MIN_COLUMNS = 2
"""Query columns a bfloat16 matmul is given at least (zero columns added): with one column oneDNN
runs a matrix-vector product that reads bfloat16 rows slower than with two (bench/scale.py)."""


def _products(block: torch.Tensor, sides: torch.Tensor, out: torch.Tensor) -> None:
    """Write into `out` `(m, b * S)` every column of `sides` `(m, k)` (float32, or float64 with float64
    blocks) times every stored row of `block` `(b, S, k)`, in the block's dtype (bfloat16 rows: the query
    side rounded to bfloat16, products rounded to bfloat16, then widened into `out`).

    The rows are the matmul's long side (`sides @ rows.T`): a few columns times many rows is the shape
    the CPU's bf16 kernels run fastest, and each column's products land contiguous, as a top-k and a
    slot mean read them. float32 rows on a CPU with more than one column go through oneDNN's
    float32 product (`mkldnn._linear_pointwise`, float32 throughout), several times faster there
    than `torch.mm`'s MKL product; one column stays with `torch.mm`, whose matrix-vector product is
    the faster one (see docs/performance.md#the-exact-scan-near-the-memory-limit).
    """
    rows = block.reshape(-1, block.shape[-1])
    if block.dtype == torch.float32 and len(sides) > 1 and block.device.type == "cpu" and _ONEDNN:
        out.copy_(torch.ops.mkldnn._linear_pointwise(rows, sides, None, "none", [], "").T)
        return
    if block.dtype in (torch.float32, torch.float64):
        torch.mm(sides, rows.T, out=out)
        return
    narrow = sides.to(block.dtype)
    padded = F.pad(narrow, (0, 0, 0, max(0, BF16_MIN_COLUMNS - len(narrow))))
    out.copy_(torch.mm(padded, rows.T)[: len(narrow)])


def _paper_products(chunk: RowChunk, sides: dict[Method, torch.Tensor]) -> dict[Method, torch.Tensor]:
    """`(..., n)` per method: `mean_s g_s . v` for every vector v `(..., k)` of `sides[method]`
    (ReTrac: `g_s / ||g_s||`).

    The slot mean is taken after the product (`mean_s(g_s) . v = mean_s(g_s . v)`) and ReTrac's
    `1 / ||g_s||` per slot: the numbers of `slot_means(chunk) @ v`. One pass over the stored rows:
    each block (`_blocks`) is multiplied with every method's vectors at once into one table of the
    chunk's products, which norms and slot means then read in place (no pass at all with one slot).
    """
    n, slots, dim = chunk.projected.shape
    device, dtype = chunk.projected.device, accumulator(dim)
    stacked = torch.stack(list(sides.values())).to(device, dtype)  # (methods, ..., k)
    shape = stacked.shape[1:-1]
    flat = stacked.reshape(-1, dim)
    products = torch.empty(len(flat), n * slots, device=device, dtype=dtype)
    for start, block in _blocks(chunk.projected, slice(None), dtype):
        _products(block, flat, products[:, start * slots : (start + block.shape[0]) * slots])
    table = products.view(len(sides), *shape, n, slots)
    out = {}
    for per_slot, method in zip(table, sides, strict=True):
        if method == "retrac":
            per_slot.mul_(inverse_norms(chunk.norms.to(device)).to(dtype))
        out[method] = per_slot[..., 0] if slots == 1 else per_slot.mean(dim=-1)
    return out


def _paper_parts(
    chunk: RowChunk, query: QueryVectors, methods: Sequence[Method]
) -> dict[Method, torch.Tensor]:
    """`(n, Q, B)` per method: `mean_s g_s . G_b` (ReTrac: `g_s / ||g_s||`), G_b band b's part of G."""
    tables = _paper_products(chunk, {m: query.band_vectors(m) for m in methods})
    return {m: table.permute(2, 0, 1) for m, table in tables.items()}


def _matched_parts(
    chunk: RowChunk, query: QueryVectors, methods: Sequence[Method], grid: slice
) -> dict[Method, torch.Tensor]:
    """`(n, Q, B)` per method: `(1/K) sum_{t in b} g_t . P h(q, t)` over the grid slots `grid`
    (ReTrac: both sides divided by their exact norms), slot t paired with query timestep t."""
    n, _, dim = chunk.projected.shape
    device, dtype = chunk.projected.device, accumulator(dim)
    per_timestep = torch.stack([query.timestep_vectors(m) for m in methods]).to(device, dtype)
    _, count, k_steps, _ = per_timestep.shape  # (methods, Q, K, k)
    sides = per_timestep.permute(2, 0, 1, 3).reshape(k_steps, -1, dim)  # (K, methods * Q, k)
    bands = query.band_weights().to(device, dtype)
    inverse = inverse_norms(chunk.norms[:, grid].to(device)).to(dtype)
    out = {m: torch.empty(n, count, bands.shape[1], device=device, dtype=dtype) for m in methods}
    for start, block in _blocks(chunk.projected, grid, dtype):
        rows = slice(start, start + block.shape[0])
        products = torch.einsum("nkd,kmd->nkm", block, sides.to(block.dtype)).to(dtype)
        products = products.view(block.shape[0], k_steps, len(methods), count)
        for i, method in enumerate(methods):
            per_slot = products[:, :, i]
            if method == "retrac":
                per_slot = per_slot * inverse[rows, :, None]
            out[method][rows] = torch.einsum("nkq,kb->nqb", per_slot, bands)
    return out


def _paper_scores(
    chunk: RowChunk, query: QueryVectors, methods: Sequence[Method]
) -> dict[Method, torch.Tensor]:
    """`(Q, n)` per method: `mean_s g_s . G` (ReTrac: `g_s / ||g_s||` and G^), without band parts:
    two columns per query, a third of `_paper_parts`' matmul, the cost of a scan."""
    return _paper_products(chunk, {m: query.mean_vector(m) for m in methods})


def _check_pairing(chunk: RowChunk, query: QueryVectors, matched: slice) -> None:
    """A SpecError unless the grid slots `matched` are as many as the query's timesteps."""
    stored, asked = len(range(*matched.indices(chunk.projected.shape[1]))), query.per_timestep.shape[1]
    if stored != asked:
        raise SpecError(
            f"the matched estimator pairs each of {stored} grid slots with a query timestep; got K = {asked}"
        )


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
    the matched one has it for free (its per-timestep products are needed anyway). The paper's
    contributions are a view of `(Q, n, C)`: each query's scores contiguous, as a top-k reads them."""
    if matched is not None:
        return {
            m: table.sum(dim=-1) for m, table in parts(chunks, queries, weights, methods, matched).items()
        }
    out: dict[Method, list[torch.Tensor]] = {m: [] for m in methods}
    for chunk, query, weight in zip(chunks, queries, weights, strict=True):
        table = _paper_scores(chunk, query, methods)
        for method in methods:
            out[method].append(weight * table[method])
    return {m: torch.stack(p, dim=-1).permute(1, 0, 2) for m, p in out.items()}


def _band_parts(
    chunks: Sequence[RowChunk],
    queries: Sequence[QueryVectors],
    weights: Sequence[float],
    method: Method,
    matched: slice | None,
    query: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Band parts `(P, B)` of the chunk rows `rows` `(P,)` (positions in `chunks`), each for its own
    query `query` `(P,)`."""
    subset = [RowChunk(c.projected[rows], c.norms[rows]) for c in chunks]
    table = parts(subset, queries, weights, [method], matched)[method]  # (P, Q, C, B)
    return table[torch.arange(len(rows)), query].sum(dim=1)


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


def _gathered(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values` `(Q, n)` or `(Q, n, C)` at the positions `index` `(Q, k)` along n."""
    return values.gather(
        1, index if values.ndim == 2 else index.unsqueeze(-1).expand(-1, -1, values.shape[2])
    )


class _Extremes:
    """Running top-k of one score table across chunks (`largest=False` keeps the bottom k)."""

    def __init__(self, top_k: int, largest: bool) -> None:
        self.top_k, self.largest = top_k, largest
        self.best: Ranked | None = None

    def add(
        self,
        first_row: int,
        contribution: torch.Tensor,
        band_parts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        """Merge rows `first_row..` with contributions `(n, Q, C)` into the kept k. `band_parts` gives
        the band parts `(P, B)` of chunk rows `(P,)` for their queries `(P,)`: asked only for the rows
        that enter the kept k (after the first chunks, a few)."""
        per_query = contribution.permute(1, 0, 2)  # (Q, n, C)
        scores = per_query[..., 0] if per_query.shape[2] == 1 else per_query.sum(dim=-1)  # (Q, n)
        local = scores.topk(
            min(self.top_k, scores.shape[1]), dim=1, largest=self.largest, sorted=False
        ).indices
        merged = [local + first_row, scores.gather(1, local), _gathered(per_query, local)]
        previous = 0
        if self.best is not None:
            previous = self.best.rows.shape[1]
            kept_before = (self.best.rows, self.best.scores, self.best.contributions)
            merged = [torch.cat(pair, dim=1) for pair in zip(kept_before, merged, strict=True)]
        kept = merged[1].topk(min(self.top_k, merged[1].shape[1]), dim=1, largest=self.largest).indices
        query, place = (kept >= previous).nonzero(as_tuple=True)
        entering = band_parts(query, local[query, kept[query, place] - previous])
        if self.best is None:
            bands = entering.new_empty(*kept.shape, entering.shape[1])
        else:
            bands = _gathered(self.best.bands, kept.clamp_max(previous - 1))
        bands[query, place] = entering
        rows, scores, contributions = (_gathered(values, kept) for values in merged)
        self.best = Ranked(rows, scores, contributions, bands)


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
