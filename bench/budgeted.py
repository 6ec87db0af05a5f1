"""Benchmark: indexing within a memory budget, against a plain training step at the same batch.

One case per process (its peak resident memory is the case's alone), random init, one random batch:

- `cifar10`: a `UNet2DModel` with google/ddpm-cifar10-32's configuration (35.7M parameters, 32x32x3),
  gradients over every parameter;
- `minisd_lora<R>`: a miniSD-sized `UNet2DConditionModel` (`MINISD`: Stable Diffusion 1.x's layout at
  0.4x its widths, 142M parameters, 32x32x4 latents as miniSD's 256 px images, 77 text states of
  width 768) with a peft LoRA of rank R on the attention projections; gradients over the LoRA alone.

The batch is the one `GradientComputer.batch_size` chooses within `--memory-budget` (at most 32); the
plain step (`gradients.plain_step`) and the per-sample gradients with a k = 4096 sketch are timed
interleaved on that batch (`--device cuda`: on the GPU, its peak the allocator's). Prints one JSON
object per case: rows/s of both, their ratio, the batch, estimated and measured peak bytes, the
budget. Figures: docs/performance.md#memory-budgets; `bench/gradients.py --presets cifar10 minisd`
runs every case.
Usage: `python bench/budgeted.py --case cifar10|minisd_lora4|... [--memory-budget 4GiB] [--repeats R]`.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from gradients import CLOCKS, TEXT_TOKENS, interleaved_medians, plain_step
from peft import LoraConfig

from api_schemas import ProjectorSpec
from retrac.budget import memory_budget, parse_bytes
from retrac.conditions import Conditions
from retrac.gradients import GradientComputer, num_parameters
from retrac.models import Denoiser, DiffusionModel, with_plain_attention
from retrac.projections import make_projector

CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, norm_num_groups=32, attention_head_dim=None, dropout=0.0,
)
"""google/ddpm-cifar10-32's UNet config."""
TEXT_WIDTH = 768
"""CLIP ViT-L/14's hidden size: SD 1.x's text states."""
MINISD = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
)
"""SD 1.x's UNet2DConditionModel (its default block types) with (320, 640, 1280, 1280) narrowed to 0.4x."""
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_BUDGET = "4GiB"
MAX_BATCH = 32


def build(case: str) -> tuple[Denoiser, int | None]:
    """The denoiser of `case` with only its gradient parameters trainable, and its text width (or None)."""
    torch.manual_seed(0)
    if case == "cifar10":
        return with_plain_attention(UNet2DModel(**CIFAR10)), None
    rank = int(case.removeprefix("minisd_lora"))
    unet = UNet2DConditionModel(**MINISD)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_B" in name:  # peft starts B at zero, which would zero every gradient of A
            torch.nn.init.normal_(parameter, std=0.02)
    return with_plain_attention(unet), TEXT_WIDTH


def peak_bytes(device: torch.device) -> int:
    """This process's peak: the CUDA allocator's on a GPU, else the resident set's (KiB on Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(
    case: str, budget: int | None, repeats: int, clock: str, device: torch.device
) -> dict[str, object]:
    unet, text = build(case)
    model = DiffusionModel.from_parts(unet, DDPMScheduler(num_train_timesteps=1000)).to(device)
    budget = memory_budget(device, budget)
    projector = make_projector(ProjectorSpec(kind="sketch", dim=4096), num_parameters(model))
    computer = GradientComputer(model, "mse", projector, chunk=MAX_BATCH, budget=budget)
    channels, size = int(unet.config.in_channels), int(unet.config.sample_size)
    generator = torch.Generator().manual_seed(0)

    def inputs(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditions]:
        states = torch.randn(count, TEXT_TOKENS, text, generator=generator) if text else None
        return (
            torch.randn(count, channels, size, size, generator=generator).to(device),
            torch.randint(0, model.num_timesteps, (count,), generator=generator).to(device),
            torch.randn(count, 1, channels, size, size, generator=generator).to(device),
            Conditions.of_text(states).to(device) if states is not None else Conditions(),
        )

    batch = computer.batch_size(*inputs(1))
    images, timesteps, noise, conditions = inputs(batch)
    jobs = {
        "plain": plain_step(model, images, timesteps, noise[:, 0], conditions),
        "per_sample": lambda: computer.compute(images, timesteps, noise, conditions=conditions),
    }
    seconds = interleaved_medians(jobs, repeats, CLOCKS[clock])
    rate = {name: batch / elapsed for name, elapsed in seconds.items()}
    peak = peak_bytes(device)
    return {
        "params": sum(p.numel() for p in unet.parameters()),
        "trainable": num_parameters(model),
        "strategy": computer.strategy,
        "batch": batch,
        "plain_rows_per_s": round(rate["plain"], 3),
        "index_rows_per_s": round(rate["per_sample"], 3),
        "ratio_to_plain": round(rate["per_sample"] / rate["plain"], 3),
        "budget_bytes": budget,
        "estimated_peak_bytes": computer.footprint(1).bytes_at(batch, 1),
        "peak_rss_bytes": peak,
        "within_budget": peak <= budget,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": clock,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, help="cifar10 or minisd_lora<R>")
    parser.add_argument(
        "--memory-budget", default=DEFAULT_BUDGET, help="a size, or 'default': the device's share"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = None if args.memory_budget == "default" else parse_bytes(args.memory_budget)
    print(json.dumps(run_case(args.case, budget, args.repeats, args.clock, torch.device(args.device))))


if __name__ == "__main__":
    main()
