"""Random projections of flattened gradients: `IdentityProjector`, `SketchProjector`, `DenseProjector`.

A projector maps gradients `(B, P)` to `(B, k)` and is fully determined by (kind, dim, seed, P):
nothing is stored but those numbers. The same operator is applied to training and query gradients,
so projected dot products estimate the exact ones (Johnson-Lindenstrauss), while ReTrac's norms are
always taken before projection.

- `identity`: exact; `k = P`. For small models and for checking the others.
- `sketch` (default): a count sketch / sparse JL transform, one random bucket and sign per
  coordinate, O(P) per gradient. Its inner-product error matches a dense projection of the same k.
- `dense`: a dense Gaussian matrix `N(0, 1/k)`, regenerated block by block from the seed, never held
  whole. Reference quality; cheap on a GPU, slow on a CPU.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from api_schemas import ProjectorKind, ProjectorSpec
from retrac.exceptions import SpecError

DENSE_BLOCK = 16_384
"""Rows of the dense matrix generated at a time: bounds its memory at DENSE_BLOCK * k floats."""


class Projector(Protocol):
    """Maps flattened gradients `(B, P)` to `(B, dim)`; linear and deterministic."""

    kind: ProjectorKind
    dim: int
    seed: int

    def project(self, gradients: torch.Tensor) -> torch.Tensor: ...


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one use (a checkpoint, a block), derived from `seed` and labels; never global RNG."""
    text = ":".join(str(part) for part in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 2


class IdentityProjector:
    """No projection: `k = P`, exact scores."""

    kind: ProjectorKind = "identity"

    def __init__(self, num_params: int, seed: int = 0) -> None:
        self.dim = num_params
        self.seed = seed

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients


class SketchProjector:
    """Count sketch: coordinate i goes to bucket h(i) with sign s(i); `(P g)_j = sum_{h(i)=j} s(i) g_i`.

    Unbiased for inner products, `E[<Pa, Pb>] = <a, b>`, variance about `|a|^2 |b|^2 / k`.
    """

    kind: ProjectorKind = "sketch"

    def __init__(self, num_params: int, dim: int, seed: int) -> None:
        self.dim, self.seed = dim, seed
        generator = torch.Generator("cpu").manual_seed(seed)
        self._buckets = torch.randint(0, dim, (num_params,), generator=generator, dtype=torch.int64)
        self._signs = torch.randint(0, 2, (num_params,), generator=generator).to(torch.float32) * 2 - 1

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        if self._buckets.device != gradients.device:
            self._buckets = self._buckets.to(gradients.device)
            self._signs = self._signs.to(gradients.device)
        out = torch.zeros(gradients.shape[0], self.dim, dtype=gradients.dtype, device=gradients.device)
        return out.index_add_(1, self._buckets, gradients * self._signs)


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
        out = torch.zeros(gradients.shape[0], self.dim, dtype=torch.float32, device=gradients.device)
        for index, start in enumerate(range(0, self._num_params, DENSE_BLOCK)):
            chunk = gradients[:, start : start + DENSE_BLOCK].float()
            out.addmm_(chunk, self._block(index, gradients.device))
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
