"""A store's rows as a `retrac.attribution.RowSource`, so that queries run through the engine's one
`attribute()`: completeness checked once up front, chunks streamed (or served from resident
memory), and the slot timesteps read for the ranked rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from api_schemas import IndexSpec, Method, StoreDType
from retrac.attribution import Chunks
from retrac.kernels import Kernel
from retrac.query_side import QueryVectors
from retrac.scoring import RowChunk
from storage.ann import candidate_chunks, load_ann
from storage.errors import IncompleteStoreError
from storage.kernels import load_kernel
from storage.store import GradientStore


class StoreRows:
    """The rows of an opened `GradientStore`, as `retrac.attribution.attribute` reads them."""

    def __init__(self, store: GradientStore) -> None:
        self.store = store

    @property
    def spec(self) -> IndexSpec:
        return self.store.spec

    @property
    def weights(self) -> Sequence[float]:
        return self.store.weights

    @property
    def sample_ids(self) -> Sequence[str]:
        return self.store.sample_ids

    @property
    def num_checkpoints(self) -> int:
        return self.store.num_checkpoints

    @property
    def dtype(self) -> StoreDType:
        return self.store.spec.dtype

    def require_complete(self, checkpoints: Sequence[int]) -> None:
        """An IncompleteStoreError naming the unfinished checkpoints and their rows done, if any."""
        status = self.store.status()
        unfinished = [status.checkpoints[c] for c in checkpoints if not status.checkpoints[c].complete]
        if unfinished:
            shown = ", ".join(
                f"checkpoint {c.checkpoint}: {c.done_rows}/{c.total_rows} rows" for c in unfinished
            )
            raise IncompleteStoreError(
                f"the index is still being built ({shown}); finish indexing (`retrac index run`, or wait "
                "for its job) or query only complete checkpoints"
            )

    def kernel(self, checkpoint: int) -> Kernel:
        """The checkpoint's stored kernel, checked against its rows and digest (`storage.kernels`)."""
        return load_kernel(self.store, checkpoint)

    def chunks(self, checkpoints: Sequence[int], rows_per_chunk: int) -> Chunks:
        return self.store.chunks(checkpoints, rows_per_chunk)

    def require_ann(self) -> None:
        """An AnnIndexError saying how to build it, if the store's ANN index is missing, stale or damaged."""
        load_ann(self.store)

    def candidates(
        self,
        checkpoints: Sequence[int],
        vectors: Sequence[QueryVectors],
        *,
        top_k: int,
        methods: Sequence[Method],
    ) -> tuple[np.ndarray, list[RowChunk]]:
        """The ANN index's candidate rows and their stored rows (`storage.ann.candidate_chunks`)."""
        return candidate_chunks(self.store, checkpoints, vectors, top_k=top_k, methods=methods)

    def timesteps_of(self, checkpoint: int, rows: np.ndarray) -> np.ndarray:
        return self.store.timesteps_of(checkpoint, rows)
