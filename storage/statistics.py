"""Answers computed from a store: attribution of query images, self-influence, norm/timestep statistics.

`attribute` is `retrac.attribution.Attributor.attribute` with the rows streamed from the store: the
same query vectors (`retrac.query_side.query_vectors`) and the same scan (`retrac.scoring.scan`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from api_schemas import Method, QuerySpec
from retrac.attribution import QueryResult, results
from retrac.exceptions import SpecError
from retrac.query_side import query_vectors
from retrac.scoring import METHODS, scan
from retrac.scoring import self_influence as score_self_influence
from retrac.computers import GradientComputerCache
from storage.errors import StoreError
from storage.store import GradientStore

SCAN_ROWS = 4096
"""Rows per scan step when streaming from disk: bounds memory at SCAN_ROWS * S * k values per checkpoint."""


@dataclass(frozen=True)
class Timings:
    """Where a query's time went, in seconds: query gradients, and the scan over the stored rows."""

    gradient_s: float
    scan_s: float


@dataclass(frozen=True)
class Attribution:
    """Per-query results (proponents and opponents per method) and the time they took."""

    results: list[QueryResult]
    timings: Timings


def attribute(
    store: GradientStore,
    images: torch.Tensor,
    query: QuerySpec,
    *,
    top_k: int = 10,
    methods: Sequence[Method] = METHODS,
    checkpoints: Sequence[int] | None = None,
    models: GradientComputerCache | None = None,
) -> Attribution:
    """Proponents and opponents of each of `images` `(Q, C, H, W)` in [-1, 1], over the stored rows.

    Pass a long-lived `models` cache (a serving process keeps one): without it, every call loads the
    checkpoints again.
    """
    expected = (store.spec.dataset.channels, store.spec.dataset.resolution, store.spec.dataset.resolution)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise SpecError(
            f"query images must be (Q, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
        )
    if top_k < 1:
        raise SpecError(f"top_k must be at least 1, got {top_k}")
    chosen = list(range(store.num_checkpoints)) if checkpoints is None else list(checkpoints)
    if not chosen:
        raise SpecError("choose at least one checkpoint")
    models = models or GradientComputerCache()
    # 1. Query vectors at every chosen checkpoint (the expensive part on a small store).
    started = time.perf_counter()
    vectors = [query_vectors(models.computer(store.plan, c), images.to(models.device), query) for c in chosen]
    gradient_s = time.perf_counter() - started
    # 2. One streamed pass over the stored rows for every query and method.
    started = time.perf_counter()
    ranking = scan(
        store.chunks(chosen, SCAN_ROWS),
        vectors,
        [store.weights[c] for c in chosen],
        top_k=top_k,
        methods=methods,
    )
    named = results(ranking, store.sample_ids, torch.from_numpy(store.timesteps(chosen[-1])))
    return Attribution(named, Timings(gradient_s=gradient_s, scan_s=time.perf_counter() - started))


def self_influence(
    store: GradientStore, checkpoints: Sequence[int] | None = None
) -> dict[Method, np.ndarray]:
    """Self-influence `(N,)` per method from the stored slots alone (method.md section 4).

    The training side is the replayed slot (or, without one, the mean over all slots); the query side
    is the mean over the grid slots, so the store needs grid slots.
    """
    kinds = store.slot_kinds
    query_slots = [s for s, kind in enumerate(kinds) if kind == "grid"]
    if not query_slots:
        raise StoreError("self-influence from the store needs grid slots; create the index with grid > 0")
    train_slots = [s for s, kind in enumerate(kinds) if kind == "replay"] or list(range(len(kinds)))
    chosen = list(range(store.num_checkpoints)) if checkpoints is None else list(checkpoints)
    weights = [store.weights[c] for c in chosen]
    parts: dict[Method, list[np.ndarray]] = {m: [] for m in METHODS}
    for _, chunk in store.chunks(chosen, SCAN_ROWS):
        values = score_self_influence(chunk, weights, train_slots, query_slots)
        for method in METHODS:
            parts[method].append(values[method].numpy())
    return {m: np.concatenate(v) for m, v in parts.items()}


@dataclass(frozen=True)
class StoredNorms:
    """The stored (timestep, exact gradient norm) of every slot of one checkpoint, `(N, S)` each."""

    timesteps: np.ndarray
    norms: np.ndarray
    slot_kinds: tuple[str, ...]


def stored_norms(store: GradientStore, checkpoint: int) -> StoredNorms:
    """(timestep, norm) pairs of every stored slot of one checkpoint: the data of method.md section 5."""
    done = store.done_shards(checkpoint)
    if not done.all():
        raise StoreError(
            f"checkpoint {checkpoint} has {int((~done).sum())} shards not done; finish indexing first"
        )
    return StoredNorms(store.timesteps(checkpoint), store.norms(checkpoint), store.slot_kinds)
