"""Queries against an index: checked against the service's limits, run one at a time, turned into
`api_schemas` answers.

One at a time, because the engine is not thread-safe: `torch.func.functional_call` swaps a shared
UNet's parameters while it runs, and an opened store fills its resident arrays on first read. A
query already uses every core (or the GPU), so a lock costs little; more throughput comes from more
service processes (`retrac serve --workers N`) or machines.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from api_schemas import Method, QuerySpec
from api_schemas.attribution import (
    AttributionPublic,
    AttributionsPublic,
    InfluencePublic,
    QueryOptions,
    RankingPublic,
    TimingsPublic,
)
from retrac.attribution import Influence, QueryResult
from retrac.exceptions import SpecError
from service.errors import Conflict
from service.settings import Settings
from retrac.computers import GradientComputerCache
from storage import GradientStore, StoredNorms, attribute, stored_norms, self_influence


class QueryEngine:
    """The model cache of this process and the lock that serialises work on models and stores."""

    def __init__(self, models: GradientComputerCache) -> None:
        self.models = models
        self._lock = threading.Lock()
        self._self_influence: weakref.WeakKeyDictionary[GradientStore, dict[Method, np.ndarray]] = (
            weakref.WeakKeyDictionary()
        )

    def attribute(
        self,
        name: str,
        store: GradientStore,
        images: Sequence[torch.Tensor],
        options: QueryOptions,
        *,
        started: float,
    ) -> AttributionsPublic:
        """Rank the store's samples for every image (one scan for all) and describe the result.

        `started` is when the request began (`time.perf_counter()`), so the total includes decoding.
        """
        checkpoints = options.checkpoints or list(range(store.num_checkpoints))
        require_complete(name, store, checkpoints)
        query = QuerySpec(timesteps=options.timesteps, draws=options.draws, seed=options.seed)
        with self._lock:
            answer = attribute(
                store,
                torch.stack(list(images)),
                query,
                top_k=options.top_k,
                methods=list(dict.fromkeys(options.methods)),
                checkpoints=checkpoints,
                models=self.models,
            )
        data = [_public_result(result) for result in answer.results]
        return AttributionsPublic(
            index=name,
            checkpoints=checkpoints,
            timesteps=query.timesteps,
            draws=query.draws,
            seed=query.seed,
            data=data,
            count=len(data),
            timings=TimingsPublic(
                gradient_s=answer.timings.gradient_s,
                scan_s=answer.timings.scan_s,
                total_s=time.perf_counter() - started,
            ),
        )

    def self_influence(self, name: str, store: GradientStore) -> dict[Method, np.ndarray]:
        """Self-influence `(N,)` per method over all checkpoints, computed once per opened store."""
        require_complete(name, store, range(store.num_checkpoints))
        with self._lock:
            if store not in self._self_influence:
                self._self_influence[store] = self_influence(store)
            return self._self_influence[store]

    def norms(self, name: str, store: GradientStore, checkpoint: int) -> StoredNorms:
        """Stored (timestep, norm) of every slot of one checkpoint."""
        require_complete(name, store, [checkpoint])
        with self._lock:
            return stored_norms(store, checkpoint)


def check_limits(options: QueryOptions, image_count: int, store: GradientStore, settings: Settings) -> None:
    """A SpecError saying which knob to lower, if the query exceeds the service's limits or the index."""
    if image_count > settings.max_images:
        raise SpecError(f"{image_count} images in one request; send at most {settings.max_images}")
    if options.top_k > settings.max_top_k:
        raise SpecError(f"top_k {options.top_k} is too large; ask for at most {settings.max_top_k}")
    gradients = options.timesteps * options.draws
    if gradients > settings.max_query_gradients:
        raise SpecError(
            f"timesteps * draws = {gradients} gradients per image exceeds {settings.max_query_gradients}; "
            "lower timesteps (K) or draws (M)"
        )
    if options.checkpoints is not None:
        outside = sorted({c for c in options.checkpoints if not 0 <= c < store.num_checkpoints})
        if outside:
            raise SpecError(
                f"checkpoints {outside} do not exist; "
                f"this index has checkpoints 0..{store.num_checkpoints - 1}"
            )
        if len(set(options.checkpoints)) != len(options.checkpoints):
            raise SpecError(f"checkpoints {options.checkpoints} repeat one; list each checkpoint once")


def require_complete(name: str, store: GradientStore, checkpoints: Sequence[int] | range) -> None:
    """A Conflict naming the unfinished checkpoints, if any of `checkpoints` is still being indexed."""
    status = store.status()
    unfinished = [status.checkpoints[c] for c in checkpoints if not status.checkpoints[c].complete]
    if unfinished:
        shown = ", ".join(f"checkpoint {c.checkpoint}: {c.done_rows}/{c.total_rows} rows" for c in unfinished)
        raise Conflict(
            f"index {name!r} is still being built ({shown}); wait for its job (GET /v1/indexes/{name}) "
            "or query only complete checkpoints"
        )


def _public_result(result: QueryResult) -> AttributionPublic:
    return AttributionPublic(
        methods={
            method: RankingPublic(
                proponents=[_public_influence(i) for i in result.proponents[method]],
                opponents=[_public_influence(i) for i in result.opponents[method]],
            )
            for method in result.proponents
        }
    )


def _public_influence(influence: Influence) -> InfluencePublic:
    return InfluencePublic(
        sample_id=influence.sample_id,
        rank=influence.rank,
        score=influence.score,
        contributions=list(influence.contributions),
        timesteps=list(influence.timesteps),
    )
