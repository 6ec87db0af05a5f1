"""Attribution of query images: one `attribute()` over any source of stored rows.

A `RowSource` is what a scan reads: chunks of rows per checkpoint, the checkpoint weights, the sample
ids and the slot timesteps of given rows. The in-memory rows of an `Attributor` (`MemoryRows`) and
the Zarr store (`storage.rows.StoreRows`) both implement it, so the CLI, the service, the
experiment and the tests all rank through the same function, with each input checked once here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from api_schemas import IndexSpec, Method, QuerySpec
from api_schemas.attribution import (
    AttributionPublic,
    AttributionsPublic,
    BandsPublic,
    InfluencePublic,
    RankingPublic,
    TimingsPublic,
)
from api_schemas.specs import Search, StoreDType
from retrac.conditions import Conditions
from retrac.exceptions import SpecError
from retrac.gradients import GradientComputer
from retrac.kernels import Kernel, build_kernel
from retrac.methods import needs_kernel, require_methods
from retrac.models import DiffusionModel
from retrac.plan import IndexPlan, Rows
from retrac.query_side import BANDS, QueryVectors, query_vectors, resolve_query
from retrac.scoring import METHODS, SCAN_ROWS, Ranked, Ranking, RowChunk, contributions, matched_slots, scan

ProgressCallback = Callable[[int], object]
"""Called with the number of rows just finished."""

QueryProgress = Callable[[str, int, int], None]
"""Called with (phase, units just finished, units in the phase): phase "gradients" counts
(image, checkpoint) pairs, phase "scan" counts stored rows."""

Chunks = Iterator[tuple[int, list[RowChunk]]]
"""(first row, one RowChunk per checkpoint), as `retrac.scoring.scan` takes them."""

QueryGradients = Callable[[torch.Tensor, QuerySpec, Sequence[int], Conditions], list[QueryVectors]]
"""Computes the query vectors of checked images `(Q, C, H, W)` in [-1, 1] under a resolved query and
its conditions at each of the chosen checkpoints, as `query_gradients` does: a serving process may
compute them in other processes, since the gradient step needs only the models, never the rows."""


class RowSource(Protocol):
    """Stored training rows an attribution scans: in memory (`MemoryRows`) or in a store."""

    @property
    def spec(self) -> IndexSpec: ...

    @property
    def weights(self) -> Sequence[float]: ...

    @property
    def sample_ids(self) -> Sequence[str]: ...

    @property
    def num_checkpoints(self) -> int: ...

    @property
    def dtype(self) -> StoreDType:
        """Precision of the rows `chunks` yields."""

    def require_complete(self, checkpoints: Sequence[int]) -> None:
        """Raise a named error saying how to finish, if any of `checkpoints` lacks rows."""

    def kernel(self, checkpoint: int) -> Kernel:
        """The TRAK kernel of `checkpoint` (`retrac.kernels`); a named error saying how to build it if
        there is none, or none current."""

    def chunks(self, checkpoints: Sequence[int], rows_per_chunk: int) -> Chunks:
        """Every row of `checkpoints`, `rows_per_chunk` (or more) at a time."""

    def timesteps_of(self, checkpoint: int, rows: np.ndarray) -> np.ndarray:
        """Slot timesteps `(len(rows), S)` of `rows` at `checkpoint`: only the ranked rows are read."""

    def require_ann(self) -> None:
        """Raise a named error saying how to build it, if the source has no current ANN index."""

    def candidates(
        self,
        checkpoints: Sequence[int],
        vectors: Sequence[QueryVectors],
        *,
        top_k: int,
        methods: Sequence[Method],
    ) -> tuple[np.ndarray, list[RowChunk]]:
        """Approximate search: sorted candidate rows for every query and method, with their stored rows
        at each of `checkpoints` (to rescore exactly)."""


@dataclass(frozen=True)
class Timings:
    """Where a query's time went, in seconds: waiting for `gradient_lock` (other queries' gradients),
    the query gradients themselves, and the scan over the stored rows."""

    wait_s: float
    gradient_s: float
    scan_s: float


@dataclass(frozen=True)
class Attribution:
    """Per-query answers (proponents and opponents per method), in image order, their timings, and
    the query as run (`resolve_query`: the matched estimator takes K, M and seed from the index)."""

    results: list[AttributionPublic]
    timings: Timings
    query: QuerySpec
    dtype: StoreDType
    """Precision of the rows scored (a store's `dtype`): bfloat16 scores are bf16 products."""
    checkpoints: list[int]
    """Positions of the checkpoints scored."""

    @property
    def search(self) -> Search:
        """Which search produced the ranking: the exact scan or the ANN index's candidates."""
        return self.query.search

    def public(
        self,
        index: str,
        images: Sequence[str],
        *,
        total_s: float,
        pool_wait_s: float = 0.0,
        notices: Sequence[str] = (),
    ) -> AttributionsPublic:
        """The answer as the API and `retrac attribute --json` give it: for index `index`, each result
        named by its query image (`images`, in order); `total_s` since the request began, `pool_wait_s`
        of the gradient step spent waiting for a gradient process (counted as waiting)."""
        ran = self.query
        return AttributionsPublic(
            index=index,
            checkpoints=self.checkpoints,
            timesteps=ran.timesteps,
            draws=ran.draws,
            seed=ran.seed,
            estimator=ran.estimator, search=ran.search, dtype=self.dtype, label=ran.label, prompt=ran.prompt,
            data=[r.model_copy(update={"image": i}) for r, i in zip(self.results, images, strict=True)],
            count=len(self.results),
            timings=TimingsPublic(
                wait_s=self.timings.wait_s + pool_wait_s,
                gradient_s=self.timings.gradient_s - pool_wait_s,
                scan_s=self.timings.scan_s,
                total_s=total_s,
            ),
            notices=list(notices),
        )


def attribute(
    source: RowSource,
    computer: Callable[[int], GradientComputer],
    images: torch.Tensor,
    query: QuerySpec,
    *,
    top_k: int = 10,
    methods: Sequence[Method] = METHODS,
    checkpoints: Sequence[int] | None = None,
    on_progress: QueryProgress | None = None,
    gradient_lock: AbstractContextManager[object] | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor],
    conditions: Callable[[QuerySpec, int], Conditions],
    gradients: QueryGradients | None = None,
) -> Attribution:
    """Proponents and opponents of each of `images` `(Q, C, H, W)` in [-1, 1], over `source`'s rows.

    `computer(c)` is the gradient computer of checkpoint c (a serving process passes a long-lived
    cache's). `encode` turns the checked images into what the denoiser takes (`IndexPlan.encode`: as
    they are, or a latent model's VAE latents). Every image is attributed under `query.label` or
    `query.prompt`, as `conditions(query, count)` gives them (`IndexPlan.query_conditions`: each needed
    by a model that takes it, refused by one that does not). Everything that can be wrong with the
    request is checked before the first gradient. `on_progress` hears of each gradient batch and each
    scanned chunk (`QueryProgress`).
    `gradient_lock` is held while the query gradients are computed, and only then: computers that
    threads share swap their model's parameters while they run, while the scan only reads. The time
    spent waiting for it is the timings' `wait_s`, apart from `gradient_s`.
    `gradients`, when given, computes the query vectors instead of `query_gradients` over `computer`
    and `encode` (a serving process's pool of gradient processes): it is called after every check,
    so a refused request never reaches it.
    """
    if query.search == "approximate" and query.estimator == "matched":
        raise SpecError(
            "approximate search serves the paper estimator (its ANN index holds the rows' mean over slots); "
            "use search exact with the matched estimator"
        )
    query = resolve_query(query, source.spec.slots)
    methods = list(dict.fromkeys(methods))
    require_methods(source.spec, methods)
    chosen = _checked_request(source, images, top_k, checkpoints, query.search)
    kernels = [source.kernel(c) for c in chosen] if needs_kernel(methods) else None
    given = conditions(query, images.shape[0])
    matched = matched_slots(source.spec.slots) if query.estimator == "matched" else None
    # 1. Query vectors at every chosen checkpoint (the expensive part on a small index).
    asked = time.perf_counter()
    on_images = _phase(on_progress, "gradients", len(images) * len(chosen))
    with gradient_lock or nullcontext():
        started = time.perf_counter()
        if gradients is None:
            vectors = query_gradients(
                computer, images, query, chosen, given, encode=encode, on_images=on_images
            )
        else:
            vectors = gradients(images, query, chosen, given)
    wait_s, gradient_s = started - asked, time.perf_counter() - started
    # 2. One streamed pass over the stored rows (or the ANN index's candidates) for every query and method,
    # trak's and dtrak's query vectors preconditioned by each checkpoint's kernel first.
    started = time.perf_counter()
    vectors = _preconditioned(vectors, kernels)
    weights = [source.weights[c] for c in chosen]
    if query.search == "approximate":
        rows, chunk = source.candidates(chosen, vectors, top_k=top_k, methods=methods)
        ranking = _renumbered(scan([(0, chunk)], vectors, weights, top_k=top_k, methods=methods), rows)
    else:
        chunks = source.chunks(chosen, SCAN_ROWS)
        on_rows = _phase(on_progress, "scan", len(source.sample_ids))
        if on_rows is not None:
            chunks = _reported(chunks, on_rows)
        ranking = scan(chunks, vectors, weights, top_k=top_k, methods=methods, matched=matched)
    answers = public_results(ranking, source, chosen[-1], query)
    timings = Timings(wait_s=wait_s, gradient_s=gradient_s, scan_s=time.perf_counter() - started)
    return Attribution(answers, timings, query, source.dtype, chosen)


def score_every_row(
    source: RowSource,
    computer: Callable[[int], GradientComputer],
    images: torch.Tensor,
    query: QuerySpec,
    *,
    methods: Sequence[Method],
    encode: Callable[[torch.Tensor], torch.Tensor],
    conditions: Callable[[QuerySpec, int], Conditions],
) -> dict[Method, torch.Tensor]:
    """The score `(Q, N)` of every stored row for each of `images` and `methods`, over every checkpoint:
    the numbers `attribute` ranks (its checks, query vectors and preconditioning, then the scan's
    per-checkpoint contributions, summed), without ranking or band parts. What a counterfactual
    evaluation needs (every sample's score, for many queries), at the cost of one scan."""
    if query.search != "exact":
        raise SpecError("scores of every row come from the exact scan; use search exact")
    query = resolve_query(query, source.spec.slots)
    methods = list(dict.fromkeys(methods))
    require_methods(source.spec, methods)
    chosen = _checked_request(source, images, 1, None, query.search)
    kernels = [source.kernel(c) for c in chosen] if needs_kernel(methods) else None
    matched = matched_slots(source.spec.slots) if query.estimator == "matched" else None
    given = conditions(query, images.shape[0])
    vectors = _preconditioned(query_gradients(computer, images, query, chosen, given, encode=encode), kernels)
    weights = [source.weights[c] for c in chosen]
    parts: dict[Method, list[torch.Tensor]] = {m: [] for m in methods}
    for _, per_checkpoint in source.chunks(chosen, SCAN_ROWS):
        table = contributions(per_checkpoint, vectors, weights, methods, matched)  # (n, Q, C) per method
        for method in methods:
            parts[method].append(table[method].sum(dim=-1).T)
    return {m: torch.cat(p, dim=1) for m, p in parts.items()}


def _preconditioned(vectors: list[QueryVectors], kernels: Sequence[Kernel] | None) -> list[QueryVectors]:
    """trak's and dtrak's query vectors: each checkpoint's preconditioned by its kernel (none: as given)."""
    if kernels is None:
        return vectors
    return [v.preconditioned_by(k) for v, k in zip(vectors, kernels, strict=True)]


def query_gradients(
    computer: Callable[[int], GradientComputer],
    images: torch.Tensor,
    query: QuerySpec,
    checkpoints: Sequence[int],
    conditions: Conditions,
    *,
    encode: Callable[[torch.Tensor], torch.Tensor],
    on_images: ProgressCallback | None = None,
) -> list[QueryVectors]:
    """The query vectors of `images` `(Q, C, H, W)` in [-1, 1] at each of `checkpoints`: the
    gradient step of `attribute`, on its own so that it can run where the models are.

    The images are encoded once (`IndexPlan.encode`: a latent model's VAE) for every checkpoint;
    `on_images(n)` hears of the n images each gradient batch completed. Nothing is checked here:
    `attribute` checks the request first.
    """
    inputs = encode(images)
    return [query_vectors(computer(c), inputs, query, on_images, conditions) for c in checkpoints]


def _renumbered(ranking: Ranking, rows: np.ndarray) -> Ranking:
    """A ranking of the chunk of `rows`, in the rows' own numbers."""
    numbers = torch.from_numpy(rows)

    def moved(ranked: Ranked) -> Ranked:
        return Ranked(
            rows=numbers[ranked.rows],
            scores=ranked.scores,
            contributions=ranked.contributions,
            bands=ranked.bands,
        )

    return Ranking(
        proponents={m: moved(r) for m, r in ranking.proponents.items()},
        opponents={m: moved(r) for m, r in ranking.opponents.items()},
    )


def _phase(on_progress: QueryProgress | None, phase: str, total: int) -> ProgressCallback | None:
    """`on_progress` bound to one phase and its size, as a plain count callback."""
    if on_progress is None:
        return None
    return lambda done: on_progress(phase, done, total)


def _reported(chunks: Chunks, on_rows: ProgressCallback) -> Chunks:
    """`chunks`, calling `on_rows(n)` once each chunk of n rows has been scanned."""
    for first_row, per_checkpoint in chunks:
        yield first_row, per_checkpoint
        on_rows(per_checkpoint[0].norms.shape[0])


def _checked_request(
    source: RowSource, images: torch.Tensor, top_k: int, checkpoints: Sequence[int] | None, search: Search
) -> list[int]:
    """The checkpoints to use, after checking the image shape, top_k, their range and completeness,
    and for an approximate search the ANN index."""
    dataset = source.spec.dataset
    expected = (dataset.channels, dataset.resolution, dataset.resolution)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        shown = ", ".join(map(str, expected))
        raise SpecError(f"query images must be (Q, {shown}), got {tuple(images.shape)}")
    if top_k < 1:
        raise SpecError(f"top_k must be at least 1, got {top_k}")
    count = source.num_checkpoints
    chosen = list(range(count)) if checkpoints is None else list(checkpoints)
    if not chosen:
        raise SpecError("choose at least one checkpoint")
    outside = sorted({c for c in chosen if not 0 <= c < count})
    if outside:
        raise SpecError(f"checkpoints {outside} do not exist; this index has checkpoints 0..{count - 1}")
    if len(set(chosen)) != len(chosen):
        raise SpecError(f"checkpoints {chosen} repeat one; list each checkpoint once")
    source.require_complete(chosen)
    if search == "approximate":
        source.require_ann()
    return chosen


def public_results(
    ranking: Ranking, source: RowSource, checkpoint: int, query: QuerySpec
) -> list[AttributionPublic]:
    """Turn a `Ranking` (row numbers) into the answer per query, naming each row's sample and slots
    and the estimator of `query`.

    The slot timesteps are those stored at `checkpoint`, read for the ranked rows only.
    """
    ranked_rows = np.unique(np.concatenate([
        r.rows.reshape(-1).numpy() for side in (ranking.proponents, ranking.opponents) for r in side.values()
    ]))
    stored = source.timesteps_of(checkpoint, ranked_rows)
    timesteps = {int(row): [int(t) for t in stored[i]] for i, row in enumerate(ranked_rows)}

    def listed(ranked: Ranked, image: int) -> list[InfluencePublic]:
        return [
            InfluencePublic(
                sample_id=source.sample_ids[row],
                rank=rank + 1,
                score=float(ranked.scores[image, rank]),
                contributions=[float(v) for v in ranked.contributions[image, rank]],
                timesteps=timesteps[row],
                bands=BandsPublic(**dict(zip(BANDS, map(float, ranked.bands[image, rank]), strict=True))),
            )
            for rank, row in enumerate(ranked.rows[image].tolist())
        ]

    count = next(iter(ranking.proponents.values())).rows.shape[0]
    return [
        AttributionPublic(estimator=query.estimator, methods={
            m: RankingPublic(
                proponents=listed(ranking.proponents[m], q), opponents=listed(ranking.opponents[m], q)
            )
            for m in ranking.proponents
        })
        for q in range(count)
    ]


@dataclass(frozen=True)
class MemoryRows:
    """Rows of every checkpoint held in memory (one `Rows` per checkpoint), as a `RowSource`, with
    the kernel of each checkpoint when the spec asks for one (`kernels`, as `kernels_of` builds them)."""

    spec: IndexSpec
    rows: Sequence[Rows]
    weights: Sequence[float]
    sample_ids: Sequence[str]
    kernels: Sequence[Kernel] | None = None

    @property
    def num_checkpoints(self) -> int:
        return len(self.rows)

    @property
    def dtype(self) -> StoreDType:
        """In-memory rows are kept as computed, float32, whatever the spec stores."""
        return "float32"

    def require_complete(self, checkpoints: Sequence[int]) -> None:
        """In-memory rows are computed whole: nothing can be missing."""

    def kernel(self, checkpoint: int) -> Kernel:
        if self.kernels is None:
            raise SpecError("these in-memory rows have no TRAK kernel: give the spec a kernel")
        return self.kernels[checkpoint]

    def chunks(self, checkpoints: Sequence[int], rows_per_chunk: int) -> Chunks:
        chosen = [self.rows[c] for c in checkpoints]
        for start in range(0, len(self.sample_ids), rows_per_chunk):
            part = slice(start, start + rows_per_chunk)
            yield start, [RowChunk(r.projected[part], r.norms[part]) for r in chosen]

    def timesteps_of(self, checkpoint: int, rows: np.ndarray) -> np.ndarray:
        return self.rows[checkpoint].timesteps[torch.from_numpy(rows)].numpy()

    def require_ann(self) -> None:
        raise SpecError(_NO_ANN)

    def candidates(
        self,
        checkpoints: Sequence[int],
        vectors: Sequence[QueryVectors],
        *,
        top_k: int,
        methods: Sequence[Method],
    ) -> tuple[np.ndarray, list[RowChunk]]:
        raise SpecError(_NO_ANN)


def kernels_of(spec: IndexSpec, rows: Sequence[RowChunk]) -> list[Kernel] | None:
    """The kernel of each checkpoint's rows (`retrac.kernels`) if `spec` asks for one, else None."""
    if spec.kernel is None:
        return None
    return [build_kernel([r], r.projected.shape[-1], spec.kernel) for r in rows]


_NO_ANN = "approximate search needs a store's ANN index; in-memory rows are searched exactly (search 'exact')"


class Attributor:
    """Holds a plan, its models (loaded once each) and, after `index()`, all rows in memory."""

    def __init__(self, plan: IndexPlan, device: torch.device | str = "cpu") -> None:
        self.plan, self.device = plan, torch.device(device)
        self.rows: list[Rows] | None = None
        self.kernels: list[Kernel] | None = None
        self.model = lru_cache(maxsize=None)(self._load_model)

    def _load_model(self, checkpoint: int) -> DiffusionModel:
        return self.plan.load_model(checkpoint, self.device)

    def computer(self, checkpoint: int) -> GradientComputer:
        """The gradient computer of one checkpoint, on this attributor's device."""
        return self.plan.gradient_computer(checkpoint, self.model(checkpoint))

    def index(self, shard_size: int | None = None, on_progress: ProgressCallback | None = None) -> list[Rows]:
        """Compute every row at every checkpoint, in shards of `shard_size` rows; `on_progress(n)` hears
        of the n rows each gradient batch completed."""
        step = shard_size or self.plan.spec.shard_size
        per_checkpoint = []
        for c in range(len(self.plan.checkpoints)):
            computer = self.computer(c)
            parts = []
            for start in range(0, self.plan.num_rows, step):
                rows = slice(start, min(start + step, self.plan.num_rows))
                parts.append(self.plan.compute_rows(c, rows, computer, on_progress))
            fields = ("projected", "norms", "timesteps", "seeds")
            per_checkpoint.append(Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in fields)))
        self.rows = per_checkpoint
        self.kernels = kernels_of(self.plan.spec, per_checkpoint)
        return per_checkpoint

    def source(self) -> MemoryRows:
        """The in-memory rows (computed first if not yet) as a `RowSource`."""
        rows = self.rows if self.rows is not None else self.index()
        return MemoryRows(self.plan.spec, rows, self.plan.weights, self.plan.dataset.ids, self.kernels)

    def query_vectors(
        self, images: torch.Tensor, spec: QuerySpec, checkpoints: Sequence[int]
    ) -> list[QueryVectors]:
        """Query vectors of `images` `(Q, C, H, W)` under `spec`'s label or prompt at each checkpoint of
        `checkpoints`."""
        conditions = self.plan.query_conditions(spec, images.shape[0])
        return query_gradients(self.computer, images, spec, checkpoints, conditions, encode=self.plan.encode)

    def attribute(
        self,
        images: torch.Tensor,
        spec: QuerySpec,
        *,
        top_k: int = 10,
        methods: Sequence[Method] = METHODS,
        checkpoints: Sequence[int] | None = None,
    ) -> list[AttributionPublic]:
        """Proponents and opponents of each image, from the in-memory rows (see `attribute`)."""
        return attribute(
            self.source(), self.computer, images, spec, top_k=top_k, methods=methods, checkpoints=checkpoints,
            encode=self.plan.encode, conditions=self.plan.query_conditions,
        ).results

    def score_every_row(
        self, images: torch.Tensor, spec: QuerySpec, *, methods: Sequence[Method] = METHODS
    ) -> dict[Method, torch.Tensor]:
        """The score `(Q, N)` of every in-memory row for each image and method (see `score_every_row`)."""
        return score_every_row(self.source(), self.computer, images, spec, methods=methods,
                               encode=self.plan.encode, conditions=self.plan.query_conditions)
