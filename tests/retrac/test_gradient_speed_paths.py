"""The fast paths of per-sample gradients and projections, against plain references.

`GradientComputer` runs layer-wise (per-layer rules from recorded inputs and output gradients) on
diffusers UNets and falls back to vmap elsewhere; each path must equal the batch-1 autograd loop,
give bit-identical results run to run (stores rely on idempotent rewrites), and project block by
block exactly as the projector projects a whole gradient.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from api_schemas import ProjectorSpec
from retrac.conditions import Conditions
from retrac.gradients import LAYER_RULES, GradientComputer, loop_gradients
from retrac.models import DiffusionModel, build_unet, with_plain_attention
from retrac.projections import DENSE_BLOCK, SketchProjector, derive_seed, make_projector
from tests.tolerances import gamma

RELATIVE_TOLERANCE = 1e-5


def model_of(unet: nn.Module) -> DiffusionModel:
    return DiffusionModel(unet, DDPMScheduler(num_train_timesteps=1000))  # type: ignore[arg-type]


def preset_model(preset: str, resolution: int, channels: int = 1) -> DiffusionModel:
    return model_of(build_unet(preset, resolution=resolution, channels=channels, seed=7))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""images `(B, C, H, W)`, timesteps `(B,)`, noise `(B, G, C, H, W)`"""


def inputs(model: DiffusionModel, batch: int, draws: int, seed: int = 0) -> Batch:
    config = model.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, *shape, generator=generator) * 2 - 1
    timesteps = torch.randint(0, model.num_timesteps, (batch,), generator=generator)
    noise = torch.randn(batch, draws, *shape, generator=generator)
    return images, timesteps, noise


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((fast - reference).norm(dim=1) / reference.norm(dim=1)).max())


def assert_matches_loop(
    model: DiffusionModel, loss: str, batch: Batch, strategy: str, conditions: Conditions = Conditions()
) -> None:
    """flat_gradients, norms and sketch projections of `compute` all equal the loop's (each sample
    under its condition, when given)."""
    reference = loop_gradients(model, loss, *batch, conditions=conditions)
    projector = make_projector(ProjectorSpec(kind="sketch", dim=4096, seed=3), reference.shape[1])
    computer = GradientComputer(model, loss, projector, chunk=3)
    assert relative_error(computer.flat_gradients(*batch, conditions), reference) < RELATIVE_TOLERANCE
    result = computer.compute(*batch, conditions=conditions)
    assert computer.strategy == strategy
    exact_norms = reference.double().norm(dim=1).float()  # a float32 norm of 0.7M entries is off by 2e-5
    torch.testing.assert_close(result.norms, exact_norms, rtol=RELATIVE_TOLERANCE, atol=0)
    assert relative_error(result.projected, projector.project(reference)) < RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    ("preset", "resolution", "loss", "draws"),
    [("micro", 8, "mse", 1), ("micro", 8, "l1", 3), ("tiny", 16, "mse", 1), ("tiny", 16, "l1", 2)],
)
def test_layerwise_gradients_equal_the_loop(preset: str, resolution: int, loss: str, draws: int) -> None:
    model = preset_model(preset, resolution)
    assert GradientComputer(model, loss).strategy == "layerwise"
    assert_matches_loop(model, loss, inputs(model, 5, draws), "layerwise")


LABELS = Conditions.of_labels([0, 3, 3, 1, 2])
"""Class labels of a batch of 5, one repeated: the Embedding rule must add a label's rows per sample only."""


@pytest.mark.parametrize("embedding", ["table", "timestep"])
def test_class_conditional_gradients_equal_the_loop(embedding: str) -> None:
    """A class embedding table (nn.Embedding, its own layer rule) or a timestep-style class embedding
    (Linear layers): the layer-wise path still applies and equals the loop, each sample under its label."""
    kind = {"table": {"num_class_embeds": 4}, "timestep": {"class_embed_type": "timestep"}}[embedding]
    torch.manual_seed(4)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8, **kind,
    )
    model = model_of(with_plain_attention(unet))
    assert GradientComputer(model, "mse").strategy == "layerwise"
    batch = inputs(model, 5, 2, seed=5)
    assert_matches_loop(model, "l1", batch, "layerwise", LABELS)
    # the label really enters: another label for sample 0 changes its gradient
    other = Conditions.of_labels([1, 3, 3, 1, 2])
    moved = loop_gradients(model, "l1", *batch, conditions=other) - loop_gradients(
        model, "l1", *batch, conditions=LABELS
    )
    assert float(moved[0].norm()) > 0
    assert float(moved[1:].norm()) == 0


def test_class_conditional_vmap_fallback_equals_the_loop() -> None:
    model = model_of(build_unet("micro", resolution=8, channels=1, seed=7, num_class_embeds=4))
    model.unet.conv_in.padding_mode = "reflect"  # no rule: the whole model goes through vmap
    assert GradientComputer(model, "mse").strategy == "vmap"
    assert_matches_loop(model, "mse", inputs(model, 5, 1, seed=6), "vmap", LABELS)


def test_frozen_parameters_are_left_out() -> None:
    model = preset_model("micro", 8)
    model.unet.conv_in.weight.requires_grad_(False)
    model.unet.time_embedding.linear_1.bias.requires_grad_(False)
    assert_matches_loop(model, "mse", inputs(model, 4, 1, seed=1), "layerwise")


def test_a_layer_without_a_rule_falls_back_to_vmap() -> None:
    model = preset_model("micro", 8)
    model.unet.conv_in.padding_mode = "reflect"  # the conv rule assumes zero padding
    assert GradientComputer(model, "mse").strategy == "vmap"
    assert_matches_loop(model, "l1", inputs(model, 4, 2, seed=2), "vmap")


def test_a_layer_output_modified_in_place_falls_back_to_vmap() -> None:
    """Skip blocks make UNet2DModel add into conv_out's output in place (`sample += skip_sample`)."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16),
        down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    model = model_of(with_plain_attention(unet))
    assert GradientComputer(model, "mse").strategy == "layerwise"  # until a forward shows otherwise
    assert_matches_loop(model, "mse", inputs(model, 3, 1, seed=3), "vmap")


class ReusedLayers(nn.Module):
    """A denoiser that applies one convolution and one norm twice: their gradients add up per call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.norm = nn.GroupNorm(1, 1)
        self.embed = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        shift = self.embed(timestep.float().unsqueeze(1) / 1000)[:, :, None, None]
        h = torch.tanh(self.norm(self.conv(x) + shift))
        return SimpleNamespace(sample=self.conv(self.norm(h)))


def test_layers_called_twice_sum_their_calls() -> None:
    torch.manual_seed(0)
    model = model_of(ReusedLayers())
    images, timesteps, noise = inputs(preset_model("micro", 8), 4, 2, seed=4)
    assert_matches_loop(model, "mse", (images, timesteps, noise), "layerwise")


def test_pointwise_conv_rule_equals_autograd_per_group() -> None:
    """The 1x1 convolution's bmm rule, on its own: each group's weight and bias gradients are those
    autograd gives for the sum of its G copies' outputs weighted by their output gradients."""
    generator = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(6, 5, kernel_size=1)
    x = torch.randn(3, 4, 6, 7, 7, generator=generator)  # B groups of G copies
    dy = torch.randn(3, 4, 5, 7, 7, generator=generator)
    rule = LAYER_RULES[nn.Conv2d](conv, x, dy)
    for b in range(x.shape[0]):
        weight, bias = torch.autograd.grad((conv(x[b]) * dy[b]).sum(), [conv.weight, conv.bias])
        # Each entry sums G * 7 * 7 products; two orders of that sum differ by twice gamma of it.
        bound = 2 * gamma(4 * 49)
        scale = (dy[b].abs().transpose(0, 1).flatten(1) @ x[b].abs().transpose(0, 1).flatten(1).T).max()
        torch.testing.assert_close(rule["weight"][b], weight, rtol=0, atol=bound * scale.item())
        torch.testing.assert_close(rule["bias"][b], bias, rtol=0, atol=bound * dy[b].abs().sum().item())


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"], ids=["layerwise", "vmap"])
def test_results_are_bit_identical_run_to_run(padding_mode: str) -> None:
    model = preset_model("tiny", 16)
    model.unet.conv_in.padding_mode = padding_mode
    batch = inputs(model, 6, 1, seed=5)
    num_params = GradientComputer(model, "mse").num_params
    projector = make_projector(ProjectorSpec(kind="sketch", dim=4096, seed=9), num_params)
    first = GradientComputer(model, "mse", projector, chunk=4).compute(*batch)
    fresh = GradientComputer(model, "mse", projector, chunk=4)
    for again in (fresh.compute(*batch), fresh.compute(*batch)):
        assert torch.equal(again.projected, first.projected)
        assert torch.equal(again.norms, first.norms)


@pytest.mark.parametrize("kind", ["identity", "sketch", "dense"])
def test_project_blocks_equals_project(kind: str) -> None:
    num_params = DENSE_BLOCK * 2 + 1000  # blocks below cross the dense projector's row blocks
    projector = make_projector(ProjectorSpec(kind=kind, dim=64, seed=11), num_params)
    gradients = torch.randn(3, num_params, generator=torch.Generator().manual_seed(0))
    bounds = [0, 5, DENSE_BLOCK - 3, DENSE_BLOCK + 7, 2 * DENSE_BLOCK + 10, num_params]
    blocks = [(start, gradients[:, start:stop].clone()) for start, stop in itertools.pairwise(bounds)]
    blockwise = projector.project_blocks(reversed(blocks), 3, gradients.device)  # any order
    # Each output sums num_params products in some order: both lie within gamma(num_params) of the
    # exact sum, measured against the sum of the products' magnitudes.
    bound = 2 * gamma(num_params) * magnitudes(kind, projector, gradients)
    assert ((blockwise - projector.project(gradients)).abs() <= bound).all()


def magnitudes(kind: str, projector: object, gradients: torch.Tensor) -> torch.Tensor:
    """`|g| @ |P|` `(B, k)`: for dense `P` rebuilt from its documented rule (row blocks of N(0, 1/k)
    drawn from derived seeds); identity and sketch entries are 0 or +-1 with one per input coordinate,
    so each output is bounded by the row's L1 norm."""
    if kind != "dense":
        return gradients.abs().sum(dim=1, keepdim=True).expand(-1, projector.dim)  # type: ignore[attr-defined]
    num_params, dim, seed = gradients.shape[1], projector.dim, projector.seed  # type: ignore[attr-defined]
    blocks = [
        torch.randn(
            min(DENSE_BLOCK, num_params - start),
            dim,
            generator=torch.Generator("cpu").manual_seed(derive_seed(seed, "block", index)),
        ).div_(dim**0.5)
        for index, start in enumerate(range(0, num_params, DENSE_BLOCK))
    ]
    return gradients.abs().double() @ torch.cat(blocks).abs().double()


def test_the_sketch_operator_is_its_documented_rule() -> None:
    """Coordinate i goes to bucket h(i) with sign s(i), both drawn in turn from one CPU generator."""
    num_params, dim, seed = 100_000, 4096, 123
    generator = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, dim, (num_params,), generator=generator, dtype=torch.int64)
    signs = torch.randint(0, 2, (num_params,), generator=generator).float() * 2 - 1
    gradients = torch.randn(4, num_params, generator=torch.Generator().manual_seed(1))
    expected = torch.zeros(4, dim).index_add_(1, buckets, gradients * signs)
    projected = SketchProjector(num_params, dim, seed).project(gradients)
    torch.testing.assert_close(projected, expected, rtol=1e-6, atol=1e-5)
