"""Benchmark: per-sample gradients + k=4096 sketch + exact norms, against a plain batched backward.

For the "tiny" (16x16x1) and "small" (32x32x3, one attention level) presets, on one random batch,
jobs are timed interleaved repetition by repetition (machine noise hits all alike), medians compared:

- plain: one batched forward and backward of the mean loss (a training step); per_sample:
  `GradientComputer.compute` (default chunk) with the default sketch projector, k = 4096;
- loop: `loop_gradients` (one backward per sample), then the same projection and norms;
- query side: `query_vectors` of one image (K = 50 timesteps, M = 4 draws, as bench/service.py's
  query, and K = 10, M = 16, past `GROUP_BACKWARD_WORK` on both models), against one plain forward
  and backward of its K*M noised copies.

`phases_share` splits one profiled `compute` by `retrac.gradients.PHASES` (the rest is the sketch and
bookkeeping; shares, not times: the profiler inflates every phase). The default clock is this
process's CPU time, which other processes do not inflate (`--clock wall` for elapsed time).

`--classes C` makes every model class-conditional (a random label per sample); `--presets dit` a
`DiTTransformer2DModel` (4 blocks of 4 x 32 heads, 2x2 patches of 16x16x4 latents, C classes, 10 by
default); `--text D` every UNet a `UNet2DConditionModel` given random text states `(B, 77, D)`: each
through the same layer rules. `--presets cifar10 minisd`: `bench/budgeted.py`'s cases, each in its own
process (docs/performance.md#memory-budgets). Figures: docs/performance.md#per-sample-gradients-training-side.
Prints one JSON object, `{"tiny": {...}, ...}` with rates in samples/s, thread count, batch size,
classes, clock, strategy; never asserts a timing.
Usage: `python bench/gradients.py [--threads N] [--repeats R] [--query-repeats R] [--clock cpu|wall]
[--classes C | --text D] [--presets tiny small dit cifar10 minisd] [--memory-budget 4GiB]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile, record_function

from api_schemas import ProjectorSpec, QuerySpec
from retrac.conditions import Conditions
from retrac.gradients import PHASES, GradientComputer, loop_gradients, num_parameters
from retrac.losses import distance, noised
from retrac.models import PRESETS, Denoiser, DiffusionModel, build_unet, with_plain_attention
from retrac.noise import query_noise
from retrac.projections import make_projector
from retrac.query_side import query_timesteps, query_vectors

SHAPES = {"tiny": (16, 1), "small": (32, 3), "dit": (16, 4)}
"""Preset -> (resolution, channels)."""
BUDGETED = ("cifar10", "minisd")
"""Presets benched within a memory budget by `bench/budgeted.py`."""
DEFAULT_PRESETS = ("tiny", "small")
DIT_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, patch_size=2, norm_num_groups=1)
DIT_CLASSES = 10
TEXT_TOKENS = 77
"""Tokens of the text encoder states a text-conditional model gets: CLIP's padded length."""
CROSS_ATTENTION = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D"}


def build_denoiser(preset: str, classes: int | None, text: int | None = None) -> Denoiser:
    """The UNet of a preset (text-conditional of width `text`, when given), or for `dit` the DiT of
    `DIT_CONFIG` (predicting epsilon alone)."""
    resolution, channels = SHAPES[preset]
    if text and preset != "dit":
        config = dict(PRESETS[preset])
        for key in ("down_block_types", "up_block_types"):
            config[key] = tuple(CROSS_ATTENTION.get(kind, kind) for kind in config[key])
        torch.manual_seed(0)
        return with_plain_attention(
            UNet2DConditionModel(
                sample_size=resolution,
                in_channels=channels,
                out_channels=channels,
                cross_attention_dim=text,
                **config,
            )
        )
    if preset != "dit":
        return build_unet(preset, resolution=resolution, channels=channels, num_class_embeds=classes)
    torch.manual_seed(0)
    return with_plain_attention(DiTTransformer2DModel(
        in_channels=channels, out_channels=channels, sample_size=resolution, num_embeds_ada_norm=classes,
        **DIT_CONFIG,
    ))

QUERIES = (QuerySpec(timesteps=50, draws=4), QuerySpec(timesteps=10, draws=16))
"""The query side's K and M: bench/service.py's query, and one with many draws."""

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def plain_step(
    model: DiffusionModel, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    conditions: Conditions,
) -> Callable[[], None]:
    """One plain batched forward and backward of the mean loss over `images` `(B, C, H, W)` noised by
    `noise` `(B, C, H, W)` under `conditions`: a training step without the update."""
    weights = [p for p in model.unet.parameters() if p.requires_grad]

    def run() -> None:
        x_t = noised(images, timesteps, noise, model.scheduler)
        value = distance(model.unet(x_t, timesteps, **conditions.tensors).sample, noise, "mse").mean()
        torch.autograd.grad(value, weights)

    return run


def interleaved_medians(
    jobs: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds of each job after one warm-up run each (allocator, kernels, lazy device moves)."""
    for job in jobs.values():
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = clock()
            job()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def phases_share(
    computer: GradientComputer, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    conditions: Conditions,
) -> dict[str, float]:
    """The share of one profiled `compute` in each labelled phase, and of the unlabelled rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("compute"):
        computer.compute(images, timesteps, noise, conditions=conditions)
    totals = {event.key: event.cpu_time_total / 1000 for event in prof.key_averages()}
    labelled = {name: ms for name, ms in totals.items() if name in PHASES or name.startswith(f"{PHASES[2]} ")}
    labelled["projection and rest"] = totals["compute"] - sum(labelled.values())
    return {name: round(ms / totals["compute"], 3) for name, ms in labelled.items()}


def bench_query(
    model: DiffusionModel, computer: GradientComputer, image: torch.Tensor, condition: Conditions,
    query: QuerySpec, repeats: int, clock: Callable[[], float],
) -> dict[str, float | int]:
    """The query's gradients against one plain forward and backward of its K*M noised copies."""
    copies = query.timesteps * query.draws
    noise = query_noise(query.seed, query.timesteps, query.draws, image.shape[1:]).flatten(0, 1)
    timesteps = query_timesteps(query.timesteps, model.num_timesteps).repeat_interleave(query.draws)
    copied = image.expand(copies, -1, -1, -1)
    plain = plain_step(model, copied, timesteps, noise, condition.repeat_interleave(copies))
    jobs = {"plain": plain, "query": lambda: query_vectors(computer, image, query, conditions=condition)}
    seconds = interleaved_medians(jobs, repeats, clock)
    return {
        "timesteps": query.timesteps,
        "draws": query.draws,
        "plain_s": round(seconds["plain"], 3),
        "gradient_s": round(seconds["query"], 3),
        "ratio_to_plain": round(seconds["query"] / seconds["plain"], 3),
    }


def bench_preset(
    preset: str, batch: int, repeats: int, query_repeats: int, clock: Callable[[], float],
    classes: int | None = None, text: int | None = None,
) -> dict[str, object]:
    resolution, channels = SHAPES[preset]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    text = text if preset != "dit" else None  # the DiT takes class labels only
    model = DiffusionModel.from_parts(build_denoiser(preset, classes, text), scheduler)
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

    def loop() -> None:
        flat = loop_gradients(model, "mse", images, timesteps, noise, conditions=conditions)
        torch.linalg.vector_norm(flat, dim=1)
        projector.project(flat)

    jobs = {
        "plain": plain_step(model, images, timesteps, noise[:, 0], conditions),
        "per_sample": lambda: computer.compute(images, timesteps, noise, conditions=conditions),
        "loop": loop,
    }
    first = conditions.select(slice(0, 1))  # the query image's condition
    rate = {name: batch / seconds for name, seconds in interleaved_medians(jobs, repeats, clock).items()}
    return {
        "params": num_parameters(model),
        "plain_per_s": round(rate["plain"], 2),
        "per_sample_per_s": round(rate["per_sample"], 2),
        "loop_per_s": round(rate["loop"], 2),
        "ratio_to_plain": round(rate["per_sample"] / rate["plain"], 3),
        "ratio_to_loop": round(rate["per_sample"] / rate["loop"], 3),
        "strategy": computer.strategy,
        "classes": classes,
        "text": text,
        "phases_share": phases_share(computer, images, timesteps, noise, conditions),
        "query": [
            bench_query(model, computer, images[:1], first, query, query_repeats, clock) for query in QUERIES
        ],
    }


def _classes(preset: str, given: int | None) -> int | None:
    """The classes a preset's model takes: those given; for a DiT (always conditional), 10 by default."""
    return given or (DIT_CLASSES if preset == "dit" else None)


def budgeted_cases(preset: str, args: argparse.Namespace) -> dict[str, object]:
    """`bench/budgeted.py`'s JSON for `preset` (minisd: one case per LoRA rank), each in its own process."""
    cases = [preset] if preset == "cifar10" else [f"minisd_lora{rank}" for rank in args.lora]
    script = str(Path(__file__).with_name("budgeted.py"))
    flags = ["--memory-budget", args.memory_budget, "--repeats", str(args.budget_repeats),
             "--threads", str(args.threads), "--clock", args.clock]
    return {
        case: json.loads(subprocess.run(
            [sys.executable, script, "--case", case, *flags], check=True, capture_output=True, text=True
        ).stdout)
        for case in cases
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--query-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=[*SHAPES, *BUDGETED])
    parser.add_argument("--memory-budget", default="4GiB", help="budgeted presets: the memory budget")
    parser.add_argument("--lora", type=int, nargs="+", default=[4, 64], help="minisd: LoRA ranks")
    parser.add_argument("--budget-repeats", type=int, default=2, help="budgeted presets: timed repeats")
    condition = parser.add_mutually_exclusive_group()
    condition.add_argument(
        "--classes", type=int, default=None, help="class-conditional models with C classes"
    )
    condition.add_argument("--text", type=int, default=None, help="text-conditional UNets of text width D")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    result: dict[str, object] = {
        preset: bench_preset(
            preset,
            args.batch,
            args.repeats,
            args.query_repeats,
            clock,
            _classes(preset, args.classes),
            args.text,
        )
        for preset in args.presets if preset not in BUDGETED
    }
    for preset in (p for p in args.presets if p in BUDGETED):
        result.update(budgeted_cases(preset, args))
    result["threads"] = torch.get_num_threads()
    result["batch"] = args.batch
    result["classes"] = args.classes
    result["clock"] = args.clock
    print(json.dumps(result))


if __name__ == "__main__":
    main()
