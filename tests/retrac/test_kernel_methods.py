"""TRAK and D-TRAK (docs/methods.md) against a brute force written from method.md section 6b with plain
diffusers, autograd and float64 linear algebra: no retrac scoring, kernel or gradient code.

The one piece of retrac the brute force takes is the projection operator `P` (a k = 64 count sketch,
checked against exact inner products in test_projection_quality.py): it is applied to the brute
force's own full autograd gradients, as a given linear map.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from api_schemas import IndexSpec, KernelSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.exceptions import SpecError
from retrac.plan import IndexPlan
from retrac.projections import make_projector
from tests.retrac.conftest import DIGITS
from tests.retrac.reference import query_draws

K, M, SLOT_SEED, DIM, RIDGE = 4, 2, 7, 64, 0.1
BANDS = ("coarse", "middle", "fine")

GRADIENT_ERROR = 1e-5
"""Relative error of the engine's batched float32 gradients against one autograd call each (~3e-6 per
coordinate, design.md), with room for the sums of a sketch bucket."""

KERNEL_ERROR = 1e-12
"""Relative: the engine's kernel and the brute force's, both float64 sums of the same float32 rows."""


def kernel_spec(run, output: str, *, kernel: bool = True) -> IndexSpec:
    return IndexSpec(
        dataset=DIGITS,
        run=str(run.folder),
        slots=SlotSpec(replay=False, grid=K, noise="shared", draws=M, seed=SLOT_SEED),
        projector=ProjectorSpec(kind="sketch", dim=DIM, seed=5),
        output_function=output,
        kernel=KernelSpec(ridge=RIDGE) if kernel else None,
        shard_size=16,
    )


@pytest.fixture(scope="module", params=["loss", "output-norm"])
def indexed(request, replay_run) -> tuple[str, Attributor]:
    attributor = Attributor(IndexPlan.resolve(kernel_spec(replay_run, request.param)))
    attributor.index()
    return request.param, attributor


def band_of(t: int, num_timesteps: int) -> str:
    return "fine" if 3 * t < num_timesteps else "middle" if 3 * t < 2 * num_timesteps else "coarse"


def brute_force(run, output: str, images: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (checkpoint, band) parts `(N, Q, C, B)` of the paper and matched kernel scores, float64.

    Each sample's slot t is the gradient of the mean over the query's M noises at grid timestep t of
    the function (the run's l1 loss, or mean_pixels eps_theta(x_t, t)^2); phi(z) the mean over slots;
    F = Phi^T Phi + lambda I with lambda = RIDGE trace(Phi^T Phi) / k; paper: phi(q)^T F^-1 phi(z) split
    by each query timestep's share of phi(q); matched: (1/K) sum_t (P h(q, t))^T F^-1 P h(z, t)."""
    scheduler = DDPMScheduler.from_pretrained(run.folder / "scheduler")
    alpha_bar = scheduler.alphas_cumprod.double()
    num_timesteps = len(alpha_bar)
    grid = [math.floor(v) for v in torch.linspace(1, num_timesteps - 1, K, dtype=torch.float64).tolist()]
    bands = [BANDS.index(band_of(t, num_timesteps)) for t in grid]
    noise = query_draws(SLOT_SEED, K, M, tuple(images.shape[1:]))
    n, count, entries = images.shape[0], queries.shape[0], run.checkpoint_entries
    shape = (n, count, len(entries), len(BANDS))
    out = {e: torch.zeros(shape, dtype=torch.float64) for e in ("paper", "matched")}
    previous = 0
    for c, entry in enumerate(entries):
        weight = entry["lr"] * run.spec.batch_size * (entry["epoch"] - previous) / len(run.sample_ids)
        previous = entry["epoch"]
        unet = UNet2DModel.from_pretrained(run.folder / entry["path"]).eval()
        params = list(unet.parameters())
        size = sum(p.numel() for p in params)
        projector = make_projector(ProjectorSpec(kind="sketch", dim=DIM, seed=5), size, c)

        def h(
            image: torch.Tensor, t: int, draws: torch.Tensor, unet=unet, params=params, projector=projector
        ) -> torch.Tensor:
            a = alpha_bar[t].float()
            x_t = a.sqrt() * image + (1 - a).sqrt() * draws  # (M, C, H, W)
            prediction = unet(x_t, torch.full((M,), t)).sample
            per_copy = (prediction - draws).abs() if output == "loss" else prediction.square()
            value = per_copy.flatten(1).mean(dim=1).mean()
            flat = torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])
            return projector.project(flat[None])[0].double()

        def slots(image: torch.Tensor) -> torch.Tensor:
            return torch.stack([h(image, t, noise[k]) for k, t in enumerate(grid)])  # (K, k)

        train = torch.stack([slots(image) for image in images])  # (N, K, k)
        query = torch.stack([slots(image) for image in queries])  # (Q, K, k)
        phi = train.mean(dim=1)
        gram = phi.T @ phi
        kernel = gram + RIDGE * gram.trace() / DIM * torch.eye(DIM, dtype=torch.float64)
        for k, band in enumerate(bands):
            solved = torch.linalg.solve(kernel, query[:, k].T)  # (k, Q): F^-1 P h(q, t)
            out["paper"][:, :, c, band] += weight * (phi @ solved) / K
            out["matched"][:, :, c, band] += weight * (train[:, k] @ solved) / K
    return out


def table(results, sample_ids, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores `(N, Q)`, contributions `(N, Q, C)`, bands `(N, Q, B)`) from every ranked sample."""
    position = {s: i for i, s in enumerate(sample_ids)}
    first = results[0].methods[method].proponents[0]
    n, count = len(sample_ids), len(results)
    scores = torch.zeros(n, count, dtype=torch.float64)
    contributions = torch.zeros(n, count, len(first.contributions), dtype=torch.float64)
    bands = torch.zeros(n, count, len(BANDS), dtype=torch.float64)
    for q, result in enumerate(results):
        for entry in result.methods[method].proponents:
            i = position[entry.sample_id]
            scores[i, q] = entry.score
            contributions[i, q] = torch.tensor(entry.contributions, dtype=torch.float64)
            bands[i, q] = torch.tensor([getattr(entry.bands, b) for b in BANDS], dtype=torch.float64)
    return scores, contributions, bands


def test_kernel_is_the_float64_gram_of_the_rows(indexed) -> None:
    _, attributor = indexed
    assert attributor.rows is not None
    assert attributor.kernels is not None
    for rows, kernel in zip(attributor.rows, attributor.kernels, strict=True):
        phi = rows.projected.double().mean(dim=1)
        gram = phi.T @ phi
        assert kernel.ridge == pytest.approx(RIDGE * float(gram.trace()) / DIM, rel=KERNEL_ERROR)
        expected = gram + kernel.ridge * torch.eye(DIM, dtype=torch.float64)
        error = float((kernel.matrix() - expected).abs().max() / expected.abs().max())
        assert error < KERNEL_ERROR


@pytest.mark.parametrize("estimator", ["paper", "matched"])
def test_kernel_scores_equal_brute_force(replay_run, digits, indexed, estimator: str) -> None:
    output, attributor = indexed
    method = "trak" if output == "loss" else "dtrak"
    queries = torch.stack([digits.images[3], torch.flip(digits.images[7], dims=[-1])])
    query = QuerySpec(timesteps=K, draws=M, seed=SLOT_SEED, estimator=estimator)
    results = attributor.attribute(queries, query, top_k=len(digits), methods=[method])
    expected = brute_force(replay_run, output, digits.images, queries)[estimator]
    scores, contributions, bands = table(results, digits.ids, method)
    # The kernel's condition number bounds how much the gradients' float32 error grows through F^-1.
    condition = max(float(torch.linalg.cond(k.matrix())) for k in attributor.kernels)  # type: ignore[union-attr]
    tolerance = condition * GRADIENT_ERROR * float(expected.sum(dim=(2, 3)).abs().max())
    assert float((scores - expected.sum(dim=(2, 3))).abs().max()) <= tolerance
    assert float((contributions - expected.sum(dim=3)).abs().max()) <= tolerance
    assert float((bands - expected.sum(dim=2)).abs().max()) <= tolerance
    for q in range(len(queries)):
        assert results[q].methods[method].proponents[0].sample_id == digits.ids[int(scores[:, q].argmax())]


def test_methods_an_index_cannot_serve_are_refused_naming_the_flag(replay_run, digits) -> None:
    queries = digits.images[:1]
    query = QuerySpec(timesteps=K, draws=M, seed=SLOT_SEED)
    cases = [
        (kernel_spec(replay_run, "loss", kernel=False), "trak", "--kernel"),
        (kernel_spec(replay_run, "loss"), "dtrak", "--output-function output-norm"),
        (kernel_spec(replay_run, "output-norm"), "tracin", "--output-function loss"),
        (kernel_spec(replay_run, "output-norm"), "retrac", "--output-function loss"),
    ]
    for spec, method, flag in cases:
        attributor = Attributor(IndexPlan.resolve(spec))
        attributor.rows = []  # refused before any row or gradient is needed
        with pytest.raises(SpecError, match=flag):
            attributor.attribute(queries, query, methods=[method])


def test_a_kernel_of_rows_too_wide_is_refused_at_resolve(replay_run) -> None:
    spec = kernel_spec(replay_run, "loss").model_copy(update={"projector": ProjectorSpec(kind="identity")})
    with pytest.raises(SpecError, match="--projector sketch"):
        IndexPlan.resolve(spec)
