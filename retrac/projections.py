"""Random projections of flattened gradients: `IdentityProjector`, `SketchProjector`, `DenseProjector`.

A projector maps gradients `(B, P)` to `(B, k)` and is fully determined by (kind, dim, seed, P):
nothing is stored but those numbers. The same operator is applied to training and query gradients,
so projected dot products estimate the exact ones (Johnson-Lindenstrauss), while ReTrac's norms are
always taken before projection. `project_blocks` applies the same operator to a gradient handed
over as column blocks (one per parameter tensor), so the full `(B, P)` gradient never has to exist.

- `identity`: exact; `k = P`. For small models and for checking the others.
- `sketch` (default): a count sketch / sparse JL transform, one random bucket and sign per
  coordinate, O(P) per gradient. Its inner-product error matches a dense projection of the same k.
- `dense`: a dense Gaussian matrix `N(0, 1/k)`, regenerated block by block from the seed, never held
  whole. Reference quality; cheap on a GPU, slow on a CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Protocol

import torch

from api_schemas import ProjectorKind, ProjectorSpec
from retrac.exceptions import SpecError

SKETCH_BLOCK = 32_768
"""Columns of a `(B, P)` gradient the sketch scatters at a time (B * 128 KiB: stays in cache)."""

DENSE_BLOCK = 16_384
"""Rows of the dense matrix generated at a time: bounds its memory at DENSE_BLOCK * k floats."""


class Projector(Protocol):
    """Maps flattened gradients `(B, P)` to `(B, dim)`; linear and deterministic."""

    kind: ProjectorKind
    dim: int
    seed: int
    table_bytes: int
    """Bytes the operator keeps (its tables or cached blocks), for memory budgets (`retrac.budget`)."""

    def project(self, gradients: torch.Tensor) -> torch.Tensor: ...

    def project_blocks(
        self, blocks: Iterable[tuple[int, torch.Tensor]], batch: int, device: torch.device
    ) -> torch.Tensor:
        """`project` of B gradients given as `(start, block (B, n))` pairs: columns `[start, start + n)`.

        Columns that no block covers count as zeros.
        """
        ...


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one use (a checkpoint, a block), derived from `seed` and labels; never global RNG."""
    text = ":".join(str(part) for part in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 2


class IdentityProjector:
    """No projection: `k = P`, exact scores."""

    kind: ProjectorKind = "identity"

    table_bytes = 0

    def __init__(self, num_params: int, seed: int = 0) -> None:
        self.dim = num_params
        self.seed = seed

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients

    def project_blocks(
        self, blocks: Iterable[tuple[int, torch.Tensor]], batch: int, device: torch.device
    ) -> torch.Tensor:
        out = torch.zeros(batch, self.dim, device=device)
        for start, block in blocks:
            out[:, start : start + block.shape[1]] = block
        return out


class SketchProjector:
    """Count sketch: coordinate i goes to bucket h(i) with sign s(i); `(P g)_j = sum_{h(i)=j} s(i) g_i`.

    Unbiased for inner products, `E[<Pa, Pb>] = <a, b>`, variance about `|a|^2 |b|^2 / k`.

    Applied block by block (`SKETCH_BLOCK` columns, or one parameter tensor, at a time), which keeps
    each block in cache while it is scattered (a scatter-add over a whole `(B, P)` gradient is several
    times slower on a CPU: docs/performance.md#per-sample-gradients-training-side). Coordinates reach
    their bucket in index order, so the result does not depend on how the columns were split into
    blocks, nor on the batch.
    """

    kind: ProjectorKind = "sketch"

    def __init__(self, num_params: int, dim: int, seed: int) -> None:
        self.dim, self.seed = dim, seed
        generator = torch.Generator("cpu").manual_seed(seed)
        self._buckets = torch.randint(0, dim, (num_params,), generator=generator, dtype=torch.int64)
        self._signs = torch.randint(0, 2, (num_params,), generator=generator).to(torch.float32) * 2 - 1
        self.table_bytes = self._buckets.nbytes + self._signs.nbytes

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        starts = range(0, gradients.shape[1], SKETCH_BLOCK)
        blocks = ((start, gradients[:, start : start + SKETCH_BLOCK]) for start in starts)
        return self.project_blocks(blocks, gradients.shape[0], gradients.device)

    def project_blocks(
        self, blocks: Iterable[tuple[int, torch.Tensor]], batch: int, device: torch.device
    ) -> torch.Tensor:
        if self._buckets.device != device:
            self._buckets, self._signs = self._buckets.to(device), self._signs.to(device)
        out = torch.zeros(batch, self.dim, device=device)
        for start, block in blocks:
            stop = start + block.shape[1]
            # scatter_add_ runs rows in parallel threads; index_add_ runs one index at a time.
            buckets = self._buckets[start:stop].expand(batch, -1)
            out.scatter_add_(1, buckets, block.float() * self._signs[start:stop])
        return out


class DenseProjector:
    """Dense Gaussian `P` with entries `N(0, 1/k)`, rows regenerated in blocks from derived seeds.

    Blocks are drawn on the CPU (so the operator is the same on every device) and cached on the
    device when they fit `cache_bytes`.
    """

    kind: ProjectorKind = "dense"

    def __init__(self, num_params: int, dim: int, seed: int, cache_bytes: int = 1 << 30) -> None:
        self.dim, self.seed, self._num_params = dim, seed, num_params
        self._cache: dict[tuple[int, str], torch.Tensor] | None = (
            {} if num_params * dim * 4 <= cache_bytes else None
        )
        self.table_bytes = (num_params if self._cache is not None else DENSE_BLOCK) * dim * 4

    def _block(self, index: int, device: torch.device) -> torch.Tensor:
        key = (index, str(device))
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        rows = min(DENSE_BLOCK, self._num_params - index * DENSE_BLOCK)
        generator = torch.Generator("cpu").manual_seed(derive_seed(self.seed, "block", index))
        block = torch.randn(rows, self.dim, generator=generator).div_(self.dim**0.5).to(device)
        if self._cache is not None:
            self._cache[key] = block
        return block

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        return self.project_blocks([(0, gradients)], gradients.shape[0], gradients.device)

    def project_blocks(
        self, blocks: Iterable[tuple[int, torch.Tensor]], batch: int, device: torch.device
    ) -> torch.Tensor:
        out = torch.zeros(batch, self.dim, device=device)
        for start, block in blocks:
            # Split the block where it crosses the row blocks of the matrix.
            position, stop = start, start + block.shape[1]
            while position < stop:
                index, row = divmod(position, DENSE_BLOCK)
                end = min(stop, (index + 1) * DENSE_BLOCK)
                rows = self._block(index, device)[row : row + end - position]
                out.addmm_(block[:, position - start : end - start].float(), rows)
                position = end
        return out


def make_projector(spec: ProjectorSpec, num_params: int, checkpoint: int = 0) -> Projector:
    """The projector of `spec` for a model with `num_params` parameters at checkpoint index `checkpoint`.

    Each checkpoint gets its own operator (seed derived from the spec's seed and the checkpoint), so
    the projection errors of different checkpoints are independent rather than repeated C times.
    """
    seed = derive_seed(spec.seed, "checkpoint", checkpoint)
    if spec.kind == "identity":
        return IdentityProjector(num_params, seed)
    if spec.kind == "sketch":
        return SketchProjector(num_params, spec.dim, seed)
    if spec.kind == "dense":
        return DenseProjector(num_params, spec.dim, seed)
    raise SpecError(f"unknown projector kind {spec.kind!r}; choose identity, sketch or dense")
