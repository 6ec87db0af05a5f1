"""The TRAK kernel of one checkpoint (method.md section 6b) and the queries it preconditions.

`Phi` `(N, k)` holds one row per sample: the mean over its stored slots of its projected gradients
(TracIn's training-side vector, `retrac.scoring.slot_means`), taken from the rows as stored (float16
rows at their exact float32 values) and accumulated in float64. The kernel is

    F = Phi^T Phi + lambda I,    lambda = ridge * trace(Phi^T Phi) / k    (`KernelSpec.ridge`)

a fraction of the mean eigenvalue of `Phi^T Phi` (TRAK's ridge, made scale-free: rows scaled by a
scale lambda by a^2; `ridge` itself if every row is zero). It is kept as its lower Cholesky factor `L`
`(k, k)` float64 (`F = L L^T`), so a query vector is preconditioned by two triangular solves, and

    trak(z, q) = sum_c w_c phi_c(q)^T F_c^{-1} phi_c(z)

is TracIn's scan over the preconditioned query vectors `F_c^{-1} phi_c(q)` (per timestep: the
matched estimator and the timestep bands split it as they split TracIn). Errors: `SpecError` for a
row width above `MAX_KERNEL_DIM` (its k x k float64 matrix), or rows that leave F not positive definite
(non-finite values).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from api_schemas import KernelSpec
from retrac.exceptions import SpecError
from retrac.scoring import RowChunk

MAX_KERNEL_DIM = 16_384
"""Widest rows a kernel is built for: its float64 k x k factor takes 8 k^2 bytes (2 GiB here)."""


@dataclass(frozen=True)
class Kernel:
    """One checkpoint's kernel: `factor` `L` `(k, k)` float64 lower triangular with `L L^T = F`,
    `ridge` the lambda added to the diagonal, `trace` that of `Phi^T Phi`, over `rows` samples."""

    factor: torch.Tensor
    ridge: float
    trace: float
    rows: int

    @property
    def dim(self) -> int:
        return int(self.factor.shape[0])

    def precondition(self, vectors: torch.Tensor) -> torch.Tensor:
        """`F^{-1} v` for every vector `v` of `vectors` `(..., k)`, solved in float64, as float32."""
        if vectors.shape[-1] != self.dim:
            raise SpecError(f"query vectors of width {vectors.shape[-1]} do not fit a kernel of k {self.dim}")
        flat = vectors.reshape(-1, self.dim).to(self.factor.device, torch.float64)
        solved = torch.cholesky_solve(flat.T, self.factor).T
        return solved.reshape(vectors.shape).to(vectors.device, torch.float32)

    def matrix(self) -> torch.Tensor:
        """F itself `(k, k)` float64 (`L L^T`): for checks and readers."""
        return self.factor @ self.factor.T


def check_kernel_width(dim: int) -> None:
    """A SpecError unless rows of width `dim` can have a kernel."""
    if dim > MAX_KERNEL_DIM:
        raise SpecError(
            f"a TRAK kernel of rows of width {dim} would take {8 * dim * dim / 2**30:.1f} GiB; project to at "
            f"most {MAX_KERNEL_DIM} dimensions (--projector sketch --dim K) to build one"
        )


class KernelBuilder:
    """Accumulates `Phi^T Phi` in float64 over chunks of one checkpoint's rows, in any order."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        check_kernel_width(dim)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, chunk: RowChunk) -> None:
        """Add the rows of `chunk` (`projected` `(n, S, k)`): their slot means' outer products."""
        means = chunk.projected.to(self.gram.device, torch.float64).mean(dim=1)
        self.gram.addmm_(means.T, means)
        self.rows += means.shape[0]

    def finish(self, spec: KernelSpec) -> Kernel:
        """The kernel of every row added, with lambda from `spec`."""
        dim = self.gram.shape[0]
        trace = float(self.gram.diagonal().sum())
        ridge = spec.ridge * trace / dim if trace > 0 else spec.ridge
        identity = torch.eye(dim, dtype=torch.float64, device=self.gram.device)
        factor, info = torch.linalg.cholesky_ex(self.gram + ridge * identity)
        if int(info) != 0 or not bool(torch.isfinite(factor).all()):
            raise SpecError("the stored rows leave the TRAK kernel not positive definite (non-finite rows?)")
        return Kernel(factor=factor, ridge=ridge, trace=trace, rows=self.rows)


def build_kernel(chunks: Iterable[RowChunk], dim: int, spec: KernelSpec) -> Kernel:
    """The kernel of all rows of `chunks` (one checkpoint's), rows of width `dim`."""
    builder = KernelBuilder(dim)
    for chunk in chunks:
        builder.add(chunk)
    return builder.finish(spec)
