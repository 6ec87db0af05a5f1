"""Queries against an index: checked against the service's limits, their gradients computed one at a
time (or by a pool of processes), turned into `api_schemas` answers; generated query images, sampled
under the same lock.

Query gradients in the service process run one at a time, because a shared gradient computer is not
thread-safe: `torch.func.functional_call` swaps its UNet's parameters while it runs. With a
`QueryPool` (`RETRAC_QUERY_POOL=N`) they run in N processes of their own, N at once. Scans only read
(an opened store fills its resident arrays under its own lock), so one request's scan runs beside
another's gradients. More throughput comes from a pool, more service processes (`retrac serve
--workers N`) or machines: docs/deployment.md says which measured best.
"""

from __future__ import annotations

import base64
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from api_schemas.attribution import AttributionsPublic, QueryOptions
from api_schemas.diagnostics import OutlierScore
from api_schemas.generation import GeneratedImagePublic, GenerateRequest, GenerationPublic
from retrac.computers import GradientComputerCache
from retrac.datasets import ImageDataset
from retrac.defaults import default_methods
from retrac.evaluation.sampling import generate_for_index
from retrac.exceptions import SpecError
from service.images import png_bytes
from service.query_pool import QueryPool
from service.settings import Settings
from storage import GradientStore, StoredNorms, attribute, outlier_scores, stored_norms


class QueryEngine:
    """The model cache of this process and the lock that serialises query gradients on its models, or
    the pool of processes that computes them (`pool`; sampling and statistics stay here). `on_answer`
    hears every attribution answer (the service's metrics)."""

    def __init__(
        self,
        models: GradientComputerCache,
        pool: QueryPool | None = None,
        *,
        on_answer: Callable[[AttributionsPublic], None] | None = None,
    ) -> None:
        self.models, self.pool, self._on_answer = models, pool, on_answer
        self._lock = threading.Lock()
        self._outlier_scores: weakref.WeakKeyDictionary[
            GradientStore, tuple[object, dict[OutlierScore, np.ndarray]]
        ] = weakref.WeakKeyDictionary()

    def attribute(
        self,
        name: str,
        store: GradientStore,
        images: Sequence[torch.Tensor],
        names: Sequence[str],
        options: QueryOptions,
        *,
        started: float,
    ) -> AttributionsPublic:
        """Rank the store's samples for every image (one scan for all, each result named by `names`)
        and describe the result.

        `started` is when the request began (`time.perf_counter()`), so the total includes decoding.
        """
        checkpoints = options.checkpoints or list(range(store.num_checkpoints))
        pool_waits: list[float] = []  # inside the gradient step's time: the pool's wait for a process
        answer = attribute(
            store,
            torch.stack(list(images)),
            options,
            top_k=options.top_k,
            methods=options.methods or default_methods(store.spec, options.estimator),
            checkpoints=checkpoints,
            models=self.models,
            gradient_lock=None if self.pool else self._lock,
            gradients=self.pool.gradients(store, pool_waits.append) if self.pool else None,
        )
        total_s = time.perf_counter() - started
        public = answer.public(name, names, total_s=total_s, pool_wait_s=sum(pool_waits))
        if self._on_answer is not None:
            self._on_answer(public)
        return public

    def generate(self, name: str, store: GradientStore, request: GenerateRequest) -> GenerationPublic:
        """Images sampled from the store's last checkpoint as PNGs, each with its condition.

        Sampling runs under the gradient lock with the cache's fixed thread count, as query gradients do:
        it is the same kind of work on the same CPU, and the same seed gives the same bytes. It samples
        from the cached model of the last checkpoint, the one its queries use, loaded once per process.
        """
        with self._lock, self.models.compute():
            made = generate_for_index(
                store.plan,
                request.count,
                label=request.label,
                guidance_scale=request.guidance_scale,
                sampler=request.sampler,
                steps=request.steps,
                seed=request.seed,
                load_model=lambda c: self.models.computer(store.plan, c).model,
            )
        images = ImageDataset(made.images, tuple(str(i) for i in range(request.count)), "generated")
        condition = request.model_dump(include={"label", "guidance_scale", "sampler", "seed"})
        data = [
            GeneratedImagePublic(
                png_base64=base64.b64encode(png_bytes(images.to_uint8(i))).decode(),
                image=i,
                steps=made.steps,
                checkpoint=made.checkpoint,
                **condition,
            )
            for i in range(request.count)
        ]
        return GenerationPublic(index=name, data=data, count=len(data))

    def outlier_scores(self, store: GradientStore) -> dict[OutlierScore, np.ndarray]:
        """Every outlier score `(N,)` (self-influence per method and the rest) over all checkpoints,
        computed once per opened store and state of its files (`ReadableStore.data_stamp`): scores of
        files since changed are computed again, and so from verified rows or refused."""
        with self._lock:
            stamp = store.data_stamp()
            cached = self._outlier_scores.get(store)
            if cached is None or cached[0] != stamp:
                cached = self._outlier_scores[store] = (stamp, outlier_scores(store))
            return cached[1]

    def norms(self, store: GradientStore, checkpoint: int) -> StoredNorms:
        """Stored (timestep, norm) of every slot of one checkpoint."""
        with self._lock:
            return stored_norms(store, checkpoint)


def check_limits(options: QueryOptions, image_count: int, settings: Settings) -> None:
    """A SpecError saying which knob to lower, if the query exceeds the service's limits (before decoding).

    What the index itself allows (checkpoint range, image shape) is checked by `retrac.attribution`.
    """
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
