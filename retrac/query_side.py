"""Query-side vectors (method.md section 3): the per-timestep gradients of a query image.

For a query image q at one checkpoint, with the grid `S_K = floor(linspace(1, T-1, K))` and M noise
draws per timestep:

    h(q, t)  = (1/M) sum_m g(theta; q, t, eps_m)       the gradient of the mean loss over M draws
    G(q)     = (1/K) sum_t P h(q, t)                     TracIn query vector
    G^(q)    = (1/K) sum_t P h(q, t) / ||h(q, t)||       ReTrac query vector (norm before projection)
    F^{-1} G(q)                                          TRAK / D-TRAK query vector (`retrac.kernels`)

`QueryVectors` keeps every `P h(q, t)`, not only their means: the matched estimator pairs each with a
training slot at the same timestep, and the timestep bands split a score by where its timesteps lie.
Every query image uses the same seeded draws (`retrac.noise.query_noise`), so a query's vectors do
not depend on which other images share its batch, and the same draws serve every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F

from api_schemas import Method, QuerySpec, SlotSpec
from retrac.conditions import Conditions
from retrac.exceptions import SpecError
from retrac.gradients import GradientComputer, inverse_norms, whole_groups
from retrac.noise import query_noise

AnyQuery = TypeVar("AnyQuery", bound=QuerySpec)

BANDS = ("coarse", "middle", "fine")
"""Timestep bands, in thirds of the schedule: coarse t >= 2T/3 (composition), middle, fine t < T/3
(texture). A score's band parts sum to it."""


WIDE_ROWS = 65_536
"""Row width past which a scan accumulates in float64 (`accumulator`): a float32 dot product of n
terms errs by up to ~sqrt(n) u of its terms' sum (u = 2^-24), 1.7e-4 relative seen at the identity
projector's 701k dimensions; a k = 4,096 sketch's stays near 1e-6 at float32's speed."""

def accumulator(dim: int) -> torch.dtype:
    """The dtype a scan multiplies and sums rows of width `dim` in: float32, or float64 past
    `WIDE_ROWS` (the identity projector's rows), where float32's error would grow with the width."""
    return torch.float64 if dim > WIDE_ROWS else torch.float32


def timestep_bands(timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """The band of each timestep, int64 like `timesteps`: its position in `BANDS`."""
    return len(BANDS) - 1 - (len(BANDS) * timesteps) // num_timesteps


class Preconditioner(Protocol):
    """What preconditions query vectors: `retrac.kernels.Kernel` (`F^{-1} v`), named here as a protocol
    so that this module need not import the kernels, which read rows as `retrac.scoring` defines them."""

    def precondition(self, vectors: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class QueryVectors:
    """Query vectors of Q images at one checkpoint over a K-timestep grid.

    `per_timestep` `(Q, K, k)`: `P h(q, t)`; `timestep_norms` `(Q, K)`: the exact `||h(q, t)||`;
    `bands` `(K,)` int64: each timestep's position in `BANDS`; `preconditioned` `(Q, K, k)`:
    `F^{-1} P h(q, t)` under the checkpoint's kernel (`preconditioned_by`), for trak and dtrak.
    """

    per_timestep: torch.Tensor
    timestep_norms: torch.Tensor
    bands: torch.Tensor
    preconditioned: torch.Tensor | None = None
    _band_vectors: dict[Method, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def timestep_vectors(self, method: Method) -> torch.Tensor:
        """`(Q, K, k)`: `P h(q, t)` (TracIn), `P h(q, t) / ||h(q, t)||` (ReTrac) or `F^{-1} P h(q, t)`
        (trak, dtrak) at each timestep."""
        if method == "tracin":
            return self.per_timestep
        if method == "retrac":
            return self.per_timestep * inverse_norms(self.timestep_norms).unsqueeze(-1)
        if self.preconditioned is None:
            raise SpecError(f"method {method} scores query vectors preconditioned by the index's kernel")
        return self.preconditioned

    def preconditioned_by(self, kernel: Preconditioner) -> QueryVectors:
        """These vectors with `preconditioned` = `F^{-1} P h(q, t)` under `kernel`."""
        return replace(self, preconditioned=kernel.precondition(self.per_timestep))

    def mean_vector(self, method: Method) -> torch.Tensor:
        """`(Q, k)`: the method's query vector, the mean over timesteps of `timestep_vectors(method)`
        (float64 for rows wider than `WIDE_ROWS`)."""
        return self.timestep_vectors(method).to(accumulator(self.per_timestep.shape[-1])).mean(dim=1)

    def band_weights(self) -> torch.Tensor:
        """`(K, B)`: 1/K where timestep t lies in band b, else 0. A timestep mean is this sum."""
        return F.one_hot(self.bands, len(BANDS)).to(torch.float32) / self.bands.shape[0]

    def band_vectors(self, method: Method) -> torch.Tensor:
        """`(Q, B, k)`: the part of the method's query vector from each band's timesteps (sum over B: G or
        G^). Computed once per method: a scan asks for it per chunk."""
        if method not in self._band_vectors:
            vectors, dtype = self.timestep_vectors(method), accumulator(self.per_timestep.shape[-1])
            weights = self.band_weights().to(dtype)
            self._band_vectors[method] = torch.einsum("qkd,kb->qbd", vectors.to(dtype), weights)
        return self._band_vectors[method]

    @property
    def tracin(self) -> torch.Tensor:
        """G `(Q, k)`: the mean over timesteps of `P h(q, t)`."""
        return self.mean_vector("tracin")

    @property
    def retrac(self) -> torch.Tensor:
        """G^ `(Q, k)`: the mean over timesteps of `P h(q, t) / ||h(q, t)||`."""
        return self.mean_vector("retrac")


def query_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """The grid `floor(linspace(1, T-1, K))`, int64 `(K,)`."""
    return torch.linspace(1, num_timesteps - 1, count, dtype=torch.float64).floor().to(torch.int64)


def resolve_query(query: AnyQuery, slots: SlotSpec) -> AnyQuery:
    """The query to run against an index whose slots are `slots`: as given for the paper's estimator.

    The matched estimator pairs query timestep t with the index's shared-noise grid slot t, so it runs
    with the index's K, M and seed: those not given explicitly are taken from the index, and a given
    one that differs is refused (the pairing would compare different timesteps or noises). A subclass
    (the service's request) keeps its class and other fields.
    """
    if query.estimator == "paper":
        return query
    if slots.noise != "shared":
        raise SpecError(
            "estimator 'matched' needs an index with shared-noise grid slots (slot noise 'shared'); "
            "this index has none: create it with --slot-noise shared --grid K (index create's default), or "
            "use estimator 'paper'"
        )
    needed = {"timesteps": slots.grid, "draws": slots.draws, "seed": slots.seed}
    clashes = [
        f"{name}={getattr(query, name)}" for name, value in needed.items()
        if name in query.model_fields_set and getattr(query, name) != value
    ]
    if clashes:
        wanted = ", ".join(f"{name}={value}" for name, value in needed.items())
        raise SpecError(
            f"estimator 'matched' uses this index's shared slots ({wanted}); got {', '.join(clashes)}: "
            "give those values or leave them out"
        )
    return query.model_copy(update=needed)


def query_vectors(
    computer: GradientComputer,
    images: torch.Tensor,
    spec: QuerySpec,
    on_images: Callable[[int], object] | None = None,
    conditions: Conditions = Conditions(),
) -> QueryVectors:
    """The per-timestep query vectors of `images` `(Q, C, H, W)` at the computer's checkpoint, each
    image under its condition (`conditions`, one row per image: a class-conditional model's label).

    `on_images(n)` is called after each gradient batch with the n images whose K timesteps it completed.
    """
    count, k_steps = images.shape[0], spec.timesteps
    timesteps = query_timesteps(k_steps, computer.model.num_timesteps)
    noise = query_noise(spec.seed, k_steps, spec.draws, images.shape[1:])
    # One gradient group per (image, timestep): Q*K groups of M noised copies each.
    batch = computer.compute(
        images.repeat_interleave(k_steps, dim=0),
        timesteps.repeat(count),
        noise.repeat(count, 1, 1, 1, 1),
        whole_groups(on_images, k_steps) if on_images is not None else None,
        conditions.repeat_interleave(k_steps),
    )
    return QueryVectors(
        per_timestep=batch.projected.reshape(count, k_steps, -1),
        timestep_norms=batch.norms.reshape(count, k_steps),
        bands=timestep_bands(timesteps, computer.model.num_timesteps),
    )
