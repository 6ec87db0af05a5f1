"""Exact-mode TracIn and ReTrac against a brute-force implementation written from method.md alone."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler, UNet2DModel

from api_schemas import QuerySpec
from retrac.attribution import Attributor
from retrac.plan import IndexPlan
from tests.retrac.conftest import index_spec

K, M, SEED = 6, 2, 11


def brute_force_scores(run, images: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, Q) scores from method.md sections 1-4, one autograd call per gradient, no retrac code."""
    alpha_bar = DDPMScheduler.from_pretrained(run.folder / "scheduler").alphas_cumprod
    num_timesteps = len(alpha_bar)
    entries = run.checkpoint_entries
    n = images.shape[0]
    scores = {"tracin": torch.zeros(n, queries.shape[0]), "retrac": torch.zeros(n, queries.shape[0])}
    previous_epoch = 0
    for entry in entries:
        weight = entry["lr"] * run.spec.batch_size * (entry["epoch"] - previous_epoch) / n
        previous_epoch = entry["epoch"]
        unet = UNet2DModel.from_pretrained(run.folder / entry["path"]).eval()
        params = list(unet.parameters())

        def gradient(image: torch.Tensor, t: int, noises: list[torch.Tensor]) -> torch.Tensor:
            losses = []
            for eps in noises:
                x_t = math.sqrt(alpha_bar[t]) * image + math.sqrt(1 - alpha_bar[t]) * eps
                prediction = unet(x_t[None], torch.tensor([t])).sample[0]  # noqa: B023 (called within this iteration only)
                losses.append((prediction - eps).abs().mean())  # the run's loss is l1
            grads = torch.autograd.grad(torch.stack(losses).mean(), params)  # noqa: B023 (called within this iteration only)
            return torch.cat([g.flatten() for g in grads])

        train_side = []
        for i in range(n):
            t = int(run.timesteps[entry["epoch"] - 1, i])
            seed = int(run.seeds[entry["epoch"] - 1, i])
            eps = torch.randn(images.shape[1:], generator=torch.Generator("cpu").manual_seed(seed))
            train_side.append(gradient(images[i], t, [eps]))
        g = torch.stack(train_side)
        grid = [math.floor(v) for v in torch.linspace(1, num_timesteps - 1, K, dtype=torch.float64).tolist()]
        for q in range(queries.shape[0]):
            generator = torch.Generator("cpu").manual_seed(SEED)
            hs = [
                gradient(
                    queries[q], t, [torch.randn(images.shape[1:], generator=generator) for _ in range(M)]
                )
                for t in grid
            ]
            tracin_query = torch.stack(hs).mean(0)
            retrac_query = torch.stack([h / h.norm() for h in hs]).mean(0)
            scores["tracin"][:, q] += weight * (g @ tracin_query)
            scores["retrac"][:, q] += weight * ((g / g.norm(dim=1, keepdim=True)) @ retrac_query)
    return scores


def engine_scores(results, sample_ids, method: str) -> torch.Tensor:
    position = {s: i for i, s in enumerate(sample_ids)}
    table = torch.zeros(len(sample_ids), len(results))
    for q, result in enumerate(results):
        for influence in result.methods[method].proponents:
            table[position[influence.sample_id], q] = influence.score
    return table


def test_exact_scores_equal_brute_force(replay_run, digits) -> None:
    plan = IndexPlan.resolve(index_spec(replay_run, kind="identity"))
    assert len(plan.checkpoints) == 2
    queries = torch.stack([digits.images[3], torch.flip(digits.images[7], dims=[-1])])
    results = Attributor(plan).attribute(
        queries, QuerySpec(timesteps=K, draws=M, seed=SEED), top_k=len(digits)
    )
    expected = brute_force_scores(replay_run, digits.images, queries)
    for method in ("tracin", "retrac"):
        got = engine_scores(results, digits.ids, method)
        torch.testing.assert_close(
            got, expected[method], rtol=1e-4, atol=1e-4 * float(expected[method].abs().max())
        )
        # the ranking order, and contributions summing to the score
        for q, result in enumerate(results):
            ranked = [i.score for i in result.methods[method].proponents]
            assert ranked == sorted(ranked, reverse=True)
            top = result.methods[method].proponents[0]
            assert math.isclose(sum(top.contributions), top.score, rel_tol=1e-5)
            assert top.sample_id == digits.ids[int(expected[method][:, q].argmax())]
            assert (
                result.methods[method].opponents[0].sample_id
                == digits.ids[int(expected[method][:, q].argmin())]
            )
