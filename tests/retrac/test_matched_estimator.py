"""The matched estimator (shared-noise grid slots, per-timestep pairing) and timestep bands, against a
brute force written from docs/method.md with plain diffusers and autograd (identity projector)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from pydantic import ValidationError

from api_schemas import IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.exceptions import SpecError
from retrac.plan import IndexPlan
from tests.retrac.conftest import DIGITS
from tests.retrac.reference import mean_gradient, query_draws
from tests.tolerances import probable

K, M, SLOT_SEED = 4, 2, 7
BANDS = ("coarse", "middle", "fine")

SCORE_TOLERANCE = 1e-4
"""Relative: batched float32 gradients against one autograd call each (~3e-6 per coordinate, design.md),
summed over ~1e5 parameters in the dot products."""


def shared_spec(run, *, replay: bool = True) -> IndexSpec:
    return IndexSpec(
        dataset=DIGITS,
        run=str(run.folder),
        slots=SlotSpec(replay=replay, grid=K, noise="shared", draws=M, seed=SLOT_SEED),
        projector=ProjectorSpec(kind="identity"),
        shard_size=16,
    )


@pytest.fixture(scope="module")
def shared(replay_run) -> Attributor:
    attributor = Attributor(IndexPlan.resolve(shared_spec(replay_run)))
    attributor.index()
    return attributor


def band_of(t: int, num_timesteps: int) -> str:
    """Thirds of the schedule: fine below T/3, middle below 2T/3, coarse above."""
    return "fine" if 3 * t < num_timesteps else "middle" if 3 * t < 2 * num_timesteps else "coarse"


def brute_force_matched(run, weights, images: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """Matched scores split per (checkpoint, band): `(N, Q, C, B)` per method, from method.md alone.

    Training slot t and query timestep t share the query's M noises; TracIn sums h(z,t).h(q,t),
    ReTrac their cosines, each over the band's timesteps, divided by K, weighted by w_c."""
    scheduler = DDPMScheduler.from_pretrained(run.folder / "scheduler")
    num_timesteps = len(scheduler.alphas_cumprod)
    grid = [math.floor(v) for v in torch.linspace(1, num_timesteps - 1, K, dtype=torch.float64).tolist()]
    noise = query_draws(SLOT_SEED, K, M, tuple(images.shape[1:]))
    n, q = images.shape[0], queries.shape[0]
    out = {m: torch.zeros(n, q, len(weights), len(BANDS)) for m in ("tracin", "retrac")}
    for c, (entry, weight) in enumerate(zip(run.checkpoint_entries, weights, strict=True)):
        unet = UNet2DModel.from_pretrained(run.folder / entry["path"]).eval()

        def h(image: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [mean_gradient(unet, scheduler, image, t, noise[k], "l1") for k, t in enumerate(grid)]  # noqa: B023 (called within this iteration only)
            )

        train = torch.stack([h(image) for image in images])  # (N, K, P)
        query = torch.stack([h(image) for image in queries])  # (Q, K, P)
        for k, t in enumerate(grid):
            b = BANDS.index(band_of(t, num_timesteps))
            a, v = train[:, k], query[:, k]
            out["tracin"][:, :, c, b] += weight * (a @ v.T) / K
            unit_a, unit_v = a / a.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
            out["retrac"][:, :, c, b] += weight * (unit_a @ unit_v.T) / K
    return out


def test_matched_scores_and_bands_equal_brute_force(replay_run, digits, shared) -> None:
    queries = torch.stack([digits.images[3], torch.flip(digits.images[7], dims=[-1])])
    images = digits.images[:12]
    results = shared.attribute(queries, QuerySpec(estimator="matched"), top_k=len(digits))
    expected = brute_force_matched(replay_run, shared.plan.weights, images, queries)
    position = {s: i for i, s in enumerate(digits.ids)}
    for method, parts in expected.items():
        for q, result in enumerate(results):
            assert result.estimator == "matched"
            ranked = result.methods[method].proponents
            assert [i.score for i in ranked] == sorted((i.score for i in ranked), reverse=True)
            for influence in ranked:
                row = position[influence.sample_id]
                if row >= len(images):
                    continue
                want = parts[row, q]
                scale = float(want.abs().sum())
                got_bands = torch.tensor([getattr(influence.bands, b) for b in BANDS])
                torch.testing.assert_close(
                    got_bands, want.sum(0), rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale
                )
                torch.testing.assert_close(torch.tensor(influence.contributions), want.sum(1),
                                           rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale)
                assert math.isclose(
                    influence.score,
                    float(want.sum()),
                    rel_tol=SCORE_TOLERANCE,
                    abs_tol=SCORE_TOLERANCE * scale,
                )


def term_magnitude(shared: Attributor, vectors, row: int, query: int, method: str, estimator: str) -> float:
    """`sum |terms|` of one score: `|w_c| |a_csi| |v_cti| / (S K)` over checkpoints, slots, coordinates and
    timesteps (matched: slot t with timestep t only), from the engine's own rows and query vectors."""
    total = 0.0
    for rows, weight, vector in zip(shared.rows, shared.plan.weights, vectors, strict=True):
        a = rows.projected[row].abs()
        if method == "retrac":
            a = a / rows.norms[row][:, None]
        v = vector.timestep_vectors(method)[query].abs()
        if estimator == "paper":
            total += abs(weight) * float(a.mean(0) @ v.mean(0))
        else:
            total += abs(weight) * float((a[1:] * v).sum()) / K
    return total


def test_band_parts_add_up_to_the_score(shared, digits) -> None:
    """Under either estimator the bands sum to the score: both are float32 sums of the same exact terms in
    other orders, so they differ by at most twice the probabilistic accumulation bound of n terms times
    sum |terms| (`tests.tolerances.probable`; gamma's worst case over ~1e5 identity coordinates is far
    above any real difference), n the longest chain of additions (S k + K + C B)."""
    images = digits.images[[0, 5]]
    rows = shared.rows[0]
    chain = rows.projected.shape[1] * rows.projected.shape[2] + K + len(shared.rows) * len(BANDS)
    for estimator in ("paper", "matched"):
        query = QuerySpec(timesteps=K, draws=M, seed=SLOT_SEED, estimator=estimator)
        vectors = shared.query_vectors(images, query, [0, 1])
        for q, result in enumerate(shared.attribute(images, query, top_k=5)):
            for method, ranking in result.methods.items():
                for influence in ranking.proponents + ranking.opponents:
                    bound = 2 * probable(chain) * term_magnitude(
                        shared, vectors, digits.ids.index(influence.sample_id), q, method, estimator
                    )
                    bands = [getattr(influence.bands, b) for b in BANDS]
                    assert abs(influence.score - sum(bands)) <= bound
                    assert abs(influence.score - sum(influence.contributions)) <= bound
                    assert bound < 0.1 * abs(influence.score)  # the check can fail: a missing band is larger


def test_a_training_image_ranks_itself_first_under_matched_retrac(shared, digits) -> None:
    """The guarantee (method.md section 4): with the query's own noise, every per-timestep cosine of an
    image with itself is 1, the largest any sample can reach, so its ReTrac score is sum_c w_c."""
    images = digits.images[:10]
    results = shared.attribute(images, QuerySpec(estimator="matched"), top_k=2, methods=["retrac"])
    ceiling = sum(shared.plan.weights)
    for row, result in enumerate(results):
        first, second = result.methods["retrac"].proponents
        assert first.sample_id == digits.ids[row]
        assert math.isclose(first.score, ceiling, rel_tol=SCORE_TOLERANCE)
        assert second.score < first.score


def test_estimators_the_index_cannot_answer_are_refused(replay_run, shared, digits) -> None:
    paper_only = Attributor(IndexPlan.resolve(shared_spec(replay_run).model_copy(
        update={"slots": SlotSpec(replay=True, grid=K, seed=SLOT_SEED)}
    )))
    with pytest.raises(SpecError, match="needs an index with shared-noise grid slots"):
        paper_only.attribute(digits.images[:1], QuerySpec(estimator="matched"))
    with pytest.raises(
        SpecError, match=r"uses this index's shared slots \(timesteps=4, draws=2, seed=7\); got timesteps=50"
    ):
        shared.attribute(digits.images[:1], QuerySpec(timesteps=50, estimator="matched"))
    # the same values given explicitly are accepted
    shared.attribute(digits.images[:1], QuerySpec(timesteps=K, draws=M, seed=SLOT_SEED, estimator="matched"))
    with pytest.raises(ValidationError, match="shared slot noise applies to grid slots"):
        SlotSpec(noise="shared")
    with pytest.raises(ValidationError, match="draws > 1 needs shared slot noise"):
        SlotSpec(grid=4, draws=2)


def test_shared_slots_record_the_slot_seed_and_the_grid(shared) -> None:
    rows = shared.rows[1]
    assert rows.timesteps[:, 1:].tolist() == [[1, 333, 666, 999]] * rows.timesteps.shape[0]
    assert (rows.seeds[:, 1:] == SLOT_SEED).all()
    assert not (rows.seeds[:, 0] == SLOT_SEED).all()  # the replayed step keeps its recorded seed
