"""Queries over a store: attribution of query images, self-influence, outlier scores, norm/timestep data.

`attribute` is `retrac.attribution.attribute` over the store's rows (`storage.rows.StoreRows`), with
the gradient computers of a `GradientComputerCache`; `query_gradients` is its gradient step alone,
for a process that computes them for another (`attribute(..., gradients=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from api_schemas import Method, QuerySpec
from api_schemas.diagnostics import OutlierScore
from retrac.attribution import Attribution, QueryGradients, QueryProgress
from retrac.attribution import attribute as attribute_rows
from retrac.attribution import query_gradients as query_gradients_of
from retrac.computers import GradientComputerCache
from retrac.conditions import Conditions
from retrac.evaluation.outliers import relative_norms, streamed_atypical_directions
from retrac.gradients import GradientComputer
from retrac.query_side import QueryVectors
from retrac.scoring import METHODS, SCAN_ROWS, RowChunk, self_influence_slots
from retrac.scoring import self_influence as score_self_influence
from storage.rows import StoreRows
from storage.store import GradientStore


def attribute(
    store: GradientStore,
    images: torch.Tensor,
    query: QuerySpec,
    *,
    top_k: int = 10,
    methods: Sequence[Method] = METHODS,
    checkpoints: Sequence[int] | None = None,
    models: GradientComputerCache | None = None,
    on_progress: QueryProgress | None = None,
    gradient_lock: AbstractContextManager[object] | None = None,
    gradients: QueryGradients | None = None,
) -> Attribution:
    """Proponents and opponents of each of `images` `(Q, C, H, W)` in [-1, 1], over the stored rows.

    Pass a long-lived `models` cache (a serving process keeps one): without it, every call loads the
    checkpoints again, and with it a `gradient_lock` if threads share it (`retrac.attribution.attribute`).
    `gradients` computes the query vectors elsewhere instead (`query_gradients` in another process).
    """
    models = models or GradientComputerCache()
    return attribute_rows(
        StoreRows(store), _computers(store, models), images, query,
        top_k=top_k, methods=methods, checkpoints=checkpoints, on_progress=on_progress,
        gradient_lock=gradient_lock, gradients=gradients,
        encode=store.plan.encode, conditions=store.plan.query_conditions,
    )


def query_gradients(
    store: GradientStore,
    images: torch.Tensor,
    query: QuerySpec,
    checkpoints: Sequence[int],
    conditions: Conditions,
    models: GradientComputerCache,
) -> list[QueryVectors]:
    """The query vectors `attribute` would compute for checked `images` at `checkpoints`, with the
    gradient computers of `models`: the same computers and encoding, so the same numbers."""
    return query_gradients_of(
        _computers(store, models), images, query, checkpoints, conditions, encode=store.plan.encode
    )


def _computers(store: GradientStore, models: GradientComputerCache) -> Callable[[int], GradientComputer]:
    """The gradient computer of each of the store's checkpoints, from `models`."""
    return lambda c: models.computer(store.plan, c)


def self_influence(
    store: GradientStore, checkpoints: Sequence[int] | None = None
) -> dict[Method, np.ndarray]:
    """Self-influence `(N,)` per method from the stored slots alone (`scoring.self_influence_slots`)."""
    train_slots, query_slots = self_influence_slots(store.slot_kinds)
    chosen = list(range(store.num_checkpoints)) if checkpoints is None else list(checkpoints)
    StoreRows(store).require_complete(chosen)
    weights = [store.weights[c] for c in chosen]
    parts: dict[Method, list[np.ndarray]] = {m: [] for m in METHODS}
    for _, chunk in store.chunks(chosen, SCAN_ROWS):
        values = score_self_influence(chunk, weights, train_slots, query_slots)
        for method in METHODS:
            parts[method].append(values[method].numpy())
    return {m: np.concatenate(v) for m, v in parts.items()}


def outlier_scores(
    store: GradientStore, checkpoints: Sequence[int] | None = None
) -> dict[OutlierScore, np.ndarray]:
    """Every outlier score `(N,)` (`api_schemas.diagnostics.OutlierScore`) from the stored slots alone,
    as `retrac.evaluation.outliers.outlier_scores` gives them for rows in memory, read chunk by chunk."""
    chosen = list(range(store.num_checkpoints)) if checkpoints is None else list(checkpoints)
    # self_influence checks that every chosen checkpoint is complete
    scores: dict[OutlierScore, np.ndarray] = dict(self_influence(store, chosen).items())
    weights = [store.weights[c] for c in chosen]
    grid = self_influence_slots(store.slot_kinds)[1]
    norms = [torch.from_numpy(store.norms(c)) for c in chosen]
    scores["relative_norm"] = relative_norms(norms, weights, grid)

    def rows() -> Iterator[Sequence[RowChunk]]:
        return (chunk for _, chunk in store.chunks(chosen, SCAN_ROWS))

    scores["atypical_direction"] = streamed_atypical_directions(rows, weights, grid)
    return scores


@dataclass(frozen=True)
class StoredNorms:
    """The stored (timestep, exact gradient norm) of every slot of one checkpoint, `(N, S)` each."""

    timesteps: np.ndarray
    norms: np.ndarray
    slot_kinds: tuple[str, ...]


def stored_norms(store: GradientStore, checkpoint: int) -> StoredNorms:
    """(timestep, norm) pairs of every stored slot of one checkpoint: the data of method.md section 5."""
    StoreRows(store).require_complete([checkpoint])
    return StoredNorms(store.timesteps(checkpoint), store.norms(checkpoint), store.slot_kinds)
