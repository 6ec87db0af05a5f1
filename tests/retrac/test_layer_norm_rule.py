"""The LayerNorm layer rule: per-sample weight and bias gradients from the recorded input and output
gradient equal the batch-1 autograd loop, on a transformer-style denoiser (diffusers'
`BasicTransformerBlock`: LayerNorms, attention and MLP Linears) and on LayerNorms over several dims
and without a bias."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from retrac.gradients import GradientComputer, loop_gradients
from retrac.models import DiffusionModel

torch.set_num_threads(1)

RELATIVE_TOLERANCE = 1e-5
"""As the other layer-rule tests: float32 sums of a few thousand terms in another order (~1e-6)."""

SIDE, CHANNELS = 4, 2


class TransformerDenoiser(nn.Module):
    """Patches of one pixel as tokens, one transformer block, and back: a DiT in miniature."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(CHANNELS, width)
        self.time = nn.Linear(1, width)
        self.block = BasicTransformerBlock(width, num_attention_heads=2, attention_head_dim=width // 2)
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, CHANNELS)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        tokens = self.embed(x.flatten(2).transpose(1, 2)) + self.time(timestep.float()[:, None, None] / 1000)
        tokens = self.out(self.norm_out(self.block(tokens)))
        return SimpleNamespace(sample=tokens.transpose(1, 2).reshape(x.shape))


class PlaneNorms(nn.Module):
    """LayerNorms over (H, W) and over (C, H, W), one of them without a bias, and one without affine
    parameters (nothing to differentiate)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.plane = nn.LayerNorm((SIDE, SIDE))
        self.volume = nn.LayerNorm((CHANNELS, SIDE, SIDE), bias=False)
        self.plain = nn.LayerNorm(SIDE, elementwise_affine=False)
        self.time = nn.Linear(1, CHANNELS)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        h = self.conv(x) + self.time(timestep.float()[:, None] / 1000)[:, :, None, None]
        return SimpleNamespace(sample=self.volume(torch.tanh(self.plane(self.plain(h)))) * 1.5)


def batch(groups: int, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(groups, CHANNELS, SIDE, SIDE, generator=generator) * 2 - 1
    timesteps = torch.randint(0, 1000, (groups,), generator=generator)
    noise = torch.randn(groups, draws, CHANNELS, SIDE, SIDE, generator=generator)
    return images, timesteps, noise


def layer_norm_columns(module: nn.Module) -> torch.Tensor:
    """Positions of the LayerNorm parameters in the flat gradient (`named_parameters` order)."""
    flags = [
        torch.full((p.numel(),), isinstance(module.get_submodule(name.rpartition(".")[0]), nn.LayerNorm))
        for name, p in module.named_parameters()
    ]
    return torch.cat(flags)


@pytest.mark.parametrize(
    ("denoiser", "draws"), [(TransformerDenoiser, 1), (TransformerDenoiser, 3), (PlaneNorms, 2)]
)
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_layer_norm_rule_equals_the_loop(denoiser: type[nn.Module], draws: int, loss: str) -> None:
    torch.manual_seed(0)
    unet = denoiser()
    for module in unet.modules():  # affine parameters away from their initial 1 and 0
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.normal_(module.weight, 1.0, 0.3)
            if module.bias is not None:
                nn.init.normal_(module.bias, 0.0, 0.3)
    model = DiffusionModel(unet, DDPMScheduler(num_train_timesteps=1000))  # type: ignore[arg-type]
    images, timesteps, noise = batch(5, draws, seed=draws)
    computer = GradientComputer(model, loss, chunk=2)
    fast = computer.flat_gradients(images, timesteps, noise)
    assert computer.strategy == "layerwise"  # the rules covered every layer: no vmap fallback
    reference = loop_gradients(model, loss, images, timesteps, noise)
    columns = layer_norm_columns(unet)
    assert columns.sum() > 0
    for part in (columns, torch.ones_like(columns)):  # the LayerNorm blocks, then everything
        error = ((fast[:, part] - reference[:, part]).norm(dim=1) / reference[:, part].norm(dim=1)).max()
        assert float(error) < RELATIVE_TOLERANCE
