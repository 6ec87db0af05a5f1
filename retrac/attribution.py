"""Attribution end to end, in memory: index a plan's rows once, then answer queries against them.

`Attributor` is what the CLI demo and the tests use directly; the service does the same steps with
the rows read from a Zarr store instead of held in memory (`query_vectors` and `scoring.scan` are
shared, only the source of the row chunks differs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from api_schemas import Method, QuerySpec
from retrac.plan import IndexPlan, Rows
from retrac.models import DiffusionModel
from retrac.query_side import QueryVectors, query_vectors
from retrac.scoring import METHODS, Ranked, Ranking, RowChunk, scan

ProgressCallback = Callable[[int], None]
"""Called with the number of rows just finished."""

SCAN_CHUNK = 4096
"""Rows per scan step: bounds the scan's working memory at SCAN_CHUNK * S * k floats per checkpoint."""


@dataclass(frozen=True)
class Influence:
    """One ranked training sample for one query and method."""

    sample_id: str
    row: int
    rank: int
    score: float
    contributions: tuple[float, ...]  # one per checkpoint used, summing to `score`
    timesteps: tuple[int, ...]  # the stored slot timesteps at the last checkpoint used


@dataclass(frozen=True)
class QueryResult:
    """Proponents (highest score first) and opponents (lowest first) of one query, per method."""

    proponents: dict[Method, list[Influence]]
    opponents: dict[Method, list[Influence]]


class Attributor:
    """Holds a plan, its models (loaded once each) and, after `index()`, all rows in memory."""

    def __init__(self, plan: IndexPlan, device: torch.device | str = "cpu") -> None:
        self.plan, self.device = plan, torch.device(device)
        self.rows: list[Rows] | None = None
        self.model = lru_cache(maxsize=None)(self._load_model)

    def _load_model(self, checkpoint: int) -> DiffusionModel:
        return self.plan.load_model(checkpoint, self.device)

    def index(self, shard_size: int | None = None, on_progress: ProgressCallback | None = None) -> list[Rows]:
        """Compute every row at every checkpoint, in shards of `shard_size` rows."""
        step = shard_size or self.plan.spec.shard_size
        per_checkpoint = []
        for c in range(len(self.plan.checkpoints)):
            computer = self.plan.gradient_computer(c, self.model(c))
            parts = []
            for start in range(0, self.plan.num_rows, step):
                rows = slice(start, min(start + step, self.plan.num_rows))
                parts.append(self.plan.compute_rows(c, rows, computer))
                if on_progress is not None:
                    on_progress(rows.stop - rows.start)
            per_checkpoint.append(Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("projected", "norms", "timesteps", "seeds"))))
        self.rows = per_checkpoint
        return per_checkpoint

    def query_vectors(self, images: torch.Tensor, spec: QuerySpec, checkpoints: Sequence[int]) -> list[QueryVectors]:
        """Query vectors of `images` `(Q, C, H, W)` at each checkpoint of `checkpoints`."""
        return [
            query_vectors(self.plan.gradient_computer(c, self.model(c)), images.to(self.device), spec)
            for c in checkpoints
        ]

    def attribute(
        self,
        images: torch.Tensor,
        spec: QuerySpec,
        *,
        top_k: int = 10,
        methods: Sequence[Method] = METHODS,
        checkpoints: Sequence[int] | None = None,
    ) -> list[QueryResult]:
        """Proponents and opponents of each image, from the in-memory rows."""
        if self.rows is None:
            self.index()
        chosen = list(checkpoints) if checkpoints is not None else list(range(len(self.plan.checkpoints)))
        queries = self.query_vectors(images, spec, chosen)
        rows = [self.rows[c] for c in chosen]  # type: ignore[index]
        ranking = scan(
            in_memory_chunks(rows, SCAN_CHUNK), queries, [self.plan.weights[c] for c in chosen],
            top_k=top_k, methods=methods,
        )
        return results(ranking, self.plan.dataset.ids, rows[-1].timesteps)


def in_memory_chunks(rows: Sequence[RowChunk], size: int) -> Iterator[tuple[int, list[RowChunk]]]:
    """Chunks of `size` rows of every checkpoint, as `scoring.scan` takes them."""
    total = rows[0].norms.shape[0]
    for start in range(0, total, size):
        part = slice(start, start + size)
        yield start, [RowChunk(r.projected[part], r.norms[part]) for r in rows]


def results(ranking: Ranking, sample_ids: Sequence[str], timesteps: torch.Tensor) -> list[QueryResult]:
    """Turn a `Ranking` (row numbers) into per-query lists of named `Influence`s."""

    def listed(ranked: Ranked, query: int) -> list[Influence]:
        return [
            Influence(
                sample_id=sample_ids[row],
                row=row,
                rank=rank + 1,
                score=float(ranked.scores[query, rank]),
                contributions=tuple(float(v) for v in ranked.contributions[query, rank]),
                timesteps=tuple(int(t) for t in timesteps[row]),
            )
            for rank, row in enumerate(ranked.rows[query].tolist())
        ]

    count = next(iter(ranking.proponents.values())).rows.shape[0]
    return [
        QueryResult(
            proponents={m: listed(r, q) for m, r in ranking.proponents.items()},
            opponents={m: listed(r, q) for m, r in ranking.opponents.items()},
        )
        for q in range(count)
    ]
