"""Transformer denoisers (DiT): exact scores against a brute force written with plain diffusers (each
sample under its class label), per-sample gradients by layer rules equal to autograd for each DiT form,
and the DiTs retrac cannot attribute exactly refused when the index is made."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, Transformer2DModel
from sklearn.datasets import load_digits

from api_schemas import QuerySpec
from cli import main
from retrac.attribution import Attributor
from retrac.conditions import Conditions
from retrac.exceptions import CheckpointError
from retrac.gradients import GradientComputer, loop_gradients
from retrac.models import DiffusionModel, load_unet
from retrac.plan import IndexPlan
from tests.retrac.dit_model import DIT_CONFIG, TIMESTEPS, dit_index_spec, save_dit_pipeline
from tests.retrac.latent_pipeline import relative_error, score_table
from tests.retrac.reference import mean_gradient, query_draws, seeded_noise, slot_scores
from tests.tolerances import probable

torch.set_num_threads(1)

K, M, SEED, LABEL = 4, 2, 7, 3
RELATIVE_ERROR = 1e-4
"""Bound on max |engine - reference| / max |reference|: float32 gradients of ~20k parameters, the layer
rules' sums taken in another order than autograd's (a few 1e-7 relative), then dot products and means."""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dit_pipeline(tmp_path_factory.mktemp("dit") / "pipeline")


def brute_force_scores(
    folder: Path,
    weight: float,
    slots: list[list[tuple[int, int]]],
    images: torch.Tensor,
    queries: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """(N, Q) TracIn and ReTrac scores of one checkpoint (method.md sections 1-4) with plain diffusers: each
    training loss under the sample's digit (scikit-learn's label), each query's under `LABEL`, one autograd
    call per gradient; `slots[n]` is sample n's (timestep, seed)."""
    dit = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    labels = load_digits().target[: len(images)].tolist()
    shape = tuple(images.shape[1:])
    grid = [math.floor(v) for v in torch.linspace(1, TIMESTEPS - 1, K, dtype=torch.float64).tolist()]
    train_side = [
        torch.stack([
            mean_gradient(dit, scheduler, image, t, seeded_noise(s, shape)[None], "mse", labels[n])
            for t, s in slots[n]
        ])
        for n, image in enumerate(images)
    ]
    noise = query_draws(SEED, K, M, shape)
    query_side = [
        torch.stack([
            mean_gradient(dit, scheduler, query, t, noise[k], "mse", LABEL) for k, t in enumerate(grid)
        ])
        for query in queries
    ]
    return slot_scores(train_side, query_side, weight)


def test_exact_scores_equal_brute_force(pipeline: Path) -> None:
    plan = IndexPlan.resolve(dit_index_spec(pipeline))
    assert plan.classes is not None
    assert plan.latent_space is None
    model = plan.load_model(0)
    assert isinstance(model.unet, DiTTransformer2DModel)
    assert plan.gradient_computer(0, model).strategy == "layerwise"
    images = plan.dataset.images
    queries = torch.stack([images[1], torch.flip(images[4], dims=[-1])])
    results = Attributor(plan).attribute(queries, QuerySpec(timesteps=K, draws=M, seed=SEED, label=LABEL),
                                         top_k=len(images))
    timesteps, seeds = plan.slots(0, slice(0, plan.num_rows))
    slots = [list(zip(timesteps[n].tolist(), seeds[n].tolist(), strict=True)) for n in range(plan.num_rows)]
    expected = brute_force_scores(pipeline, 0.5, slots, images, queries)
    answers = [r.model_dump(mode="json") for r in results]
    for method in ("tracin", "retrac"):
        got = score_table(answers, plan.dataset.ids, method)
        assert relative_error(got, expected[method]) < RELATIVE_ERROR


@pytest.mark.parametrize("form", ["dit", "affine-norms", "transformer-2d"])
def test_layer_rules_equal_one_autograd_call_per_sample(form: str, tmp_path: Path) -> None:
    """Per-sample gradients of a DiT by the layer rules (Conv2d patch embedding, Linear, LayerNorm with and
    without affine parameters, the label table's Embedding) and by vmap equal one autograd call per sample,
    for a DiTTransformer2DModel and a Transformer2DModel in DiT's patched form (saved as its own class)."""
    torch.manual_seed(1)
    if form == "transformer-2d":
        Transformer2DModel(**DIT_CONFIG, norm_type="ada_norm_zero").save_pretrained(tmp_path)
    else:
        affine = form == "affine-norms"
        DiTTransformer2DModel(**DIT_CONFIG, norm_elementwise_affine=affine).save_pretrained(tmp_path)
    model = DiffusionModel.from_parts(load_unet(tmp_path), DDPMScheduler(num_train_timesteps=TIMESTEPS))
    computer = GradientComputer(model, "mse")
    images, timesteps = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 99])
    noise, conditions = torch.randn(3, 2, 1, 8, 8), Conditions.of_labels([0, 9, 4])
    layerwise = computer.flat_gradients(images, timesteps, noise, conditions)
    assert computer.strategy == "layerwise"
    computer._layers = None  # the vmap path of the same computer
    by_vmap = computer.flat_gradients(images, timesteps, noise, conditions)
    reference = loop_gradients(model, "mse", images, timesteps, noise, conditions=conditions)
    tolerance = probable(computer.num_params) * float(reference.abs().max())
    torch.testing.assert_close(layerwise, reference, rtol=0, atol=tolerance)
    torch.testing.assert_close(by_vmap, reference, rtol=0, atol=tolerance)


def test_inexact_dits_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sigma = save_dit_pipeline(tmp_path / "sigma", out_channels=2)  # learned sigma: eps and variance channels
    with pytest.raises(CheckpointError, match="maps 1 channels to 2 .learned variances"):
        IndexPlan.resolve(dit_index_spec(sigma))
    capsys.readouterr()
    assert main(["index", "create", str(tmp_path / "store"), "--checkpoint", f"{sigma}:weight=1",
                 "--loss", "mse", "--data", "builtin:digits", "--limit", "4", "--no-replay",
                 "--grid", "1", "--slot-noise", "independent"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "out_channels = in_channels" in error
    assert not (tmp_path / "store").exists()
    plain = tmp_path / "plain"  # a Transformer2DModel over continuous inputs, not DiT's patched form
    Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, norm_num_groups=2,
                       sample_size=8).save_pretrained(plain / "transformer")
    DDPMScheduler(num_train_timesteps=TIMESTEPS).save_pretrained(plain / "scheduler")
    with pytest.raises(CheckpointError, match="not DiT's patched, class-conditional form"):
        IndexPlan.resolve(dit_index_spec(plain))
