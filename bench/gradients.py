"""Benchmark: per-sample gradients + k=4096 sketch + exact norms, against a plain batched backward.

For the "tiny" (16x16x1) and "small" (32x32x3, one attention level) presets, on one batch of
random images, timesteps and noise, three jobs are timed, interleaved repetition by repetition so
that machine noise hits all of them alike, and their medians compared:

- plain: one batched forward and backward of the mean loss (what training does per step);
- per_sample: `GradientComputer.compute` (default chunk) with the default sketch projector, k = 4096;
- loop: `loop_gradients` (one backward per sample), then the same projection and norms.

With `--classes C` every model is class-conditional (`num_class_embeds = C`, a random label per
sample, passed to all three jobs), so the class embedding's layer rule is measured the same way.
With `--text D` every model is a text-conditional `UNet2DConditionModel` of the preset's channels and
levels (its attention blocks cross-attention blocks, `cross_attention_dim = D`, plain attention), given
random text encoder states `(B, 77, D)`: the cross-attention's Linear and LayerNorm rules, measured alike.

Prints one JSON object on stdout, `{"tiny": {...}, "small": {...}}` with rates in samples/s, plus the
thread count, batch size, classes and the computer's strategy; never asserts a timing.
Usage: `python bench/gradients.py [--threads N] [--repeats R] [--classes C | --text D]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from api_schemas import ProjectorSpec
from retrac.conditions import Conditions
from retrac.gradients import GradientComputer, loop_gradients, num_parameters
from retrac.losses import distance, noised
from retrac.models import PRESETS, DiffusionModel, build_unet, with_plain_attention
from retrac.projections import make_projector

SHAPES = {"tiny": (16, 1), "small": (32, 3)}
"""Preset -> (resolution, channels)."""
TEXT_TOKENS = 77
"""Tokens of the text encoder states a text-conditional model gets: CLIP's padded length."""
CROSS_ATTENTION = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D"}


def text_unet(preset: str, resolution: int, channels: int, width: int) -> UNet2DConditionModel:
    """A UNet2DConditionModel with the preset's levels, its attention blocks cross-attending to `width`."""
    config = dict(PRESETS[preset])
    for key in ("down_block_types", "up_block_types"):
        config[key] = tuple(CROSS_ATTENTION.get(kind, kind) for kind in config[key])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                                cross_attention_dim=width, **config)
    return with_plain_attention(unet)


def _seconds(job: Callable[[], object]) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def bench_preset(
    preset: str, batch: int, repeats: int, classes: int | None = None, text: int | None = None
) -> dict[str, float | int | str]:
    resolution, channels = SHAPES[preset]
    unet = (
        text_unet(preset, resolution, channels, text) if text
        else build_unet(preset, resolution=resolution, channels=channels, num_class_embeds=classes)
    )
    model = DiffusionModel.from_parts(unet, DDPMScheduler(num_train_timesteps=1000))
    generator = torch.Generator().manual_seed(0)
    if text:
        conditions = Conditions.of_text(torch.randn(batch, TEXT_TOKENS, text, generator=generator))
    elif classes:
        conditions = Conditions.of_labels(torch.randint(0, classes, (batch,), generator=generator))
    else:
        conditions = Conditions()
    images = torch.randn(batch, channels, resolution, resolution, generator=generator)
    timesteps = torch.randint(0, model.num_timesteps, (batch,), generator=generator)
    noise = torch.randn(batch, 1, channels, resolution, resolution, generator=generator)
    projector = make_projector(ProjectorSpec(kind="sketch", dim=4096), num_parameters(model))
    computer = GradientComputer(model, "mse", projector)
    weights = [p for p in model.unet.parameters() if p.requires_grad]

    def plain() -> None:
        x_t = noised(images, timesteps, noise[:, 0], model.scheduler)
        value = distance(model.unet(x_t, timesteps, **conditions.tensors).sample, noise[:, 0], "mse").mean()
        torch.autograd.grad(value, weights)

    def per_sample() -> None:
        computer.compute(images, timesteps, noise, conditions=conditions)

    def loop() -> None:
        flat = loop_gradients(model, "mse", images, timesteps, noise, conditions=conditions)
        torch.linalg.vector_norm(flat, dim=1)
        projector.project(flat)

    jobs = {"plain": plain, "per_sample": per_sample, "loop": loop}
    for job in jobs.values():  # warm-up: allocator, kernels, lazy device moves
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(_seconds(job))
    rate = {name: batch / statistics.median(t) for name, t in times.items()}
    return {
        "params": num_parameters(model),
        "plain_per_s": round(rate["plain"], 2),
        "per_sample_per_s": round(rate["per_sample"], 2),
        "loop_per_s": round(rate["loop"], 2),
        "ratio_to_plain": round(rate["per_sample"] / rate["plain"], 3),
        "ratio_to_loop": round(rate["per_sample"] / rate["loop"], 3),
        "strategy": computer.strategy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    condition = parser.add_mutually_exclusive_group()
    condition.add_argument("--classes", type=int, default=None, help="class-conditional models with C classes")
    condition.add_argument("--text", type=int, default=None, help="text-conditional models of text width D")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {
        preset: bench_preset(preset, args.batch, args.repeats, args.classes, args.text) for preset in args.presets
    }
    result["threads"] = torch.get_num_threads()
    result["batch"] = args.batch
    result["classes"] = args.classes
    result["text"] = args.text
    print(json.dumps(result))


if __name__ == "__main__":
    main()
