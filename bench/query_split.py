"""Benchmark: where a query's layer-wise gradient time goes, against the plain step of its K*M copies.

For each query of `bench/gradients.py` (K = 50, M = 4 and K = 10, M = 16) on one preset's UNet, one
thread, the layer-wise path (`GradientComputer`'s, chunk by chunk) is timed phase by phase with the
process's CPU clock: forward with the layer records, backward to the layer outputs, each layer type's
rules, norms, the k=4096 sketch; and the plain step (one forward and backward of the K*M noised copies
in one batch) split into its forward and backward. Every figure is a fraction of the plain step's
time in the same repetition, and the median over repetitions is kept. Unlike `phases_share` of
`bench/gradients.py` no profiler runs, whose cost per op inflates the rules' many small calls.
Also timed, whole: `query_vectors` as it runs (`default`: layer-wise, or one backward per group past
`GROUP_BACKWARD_WORK`), and forced down each path (`layerwise`, `group_backward`), which checks the
threshold for this model's K and M.

Prints one JSON object on stdout, per query `{"plain": {...}, "layerwise": {...}, "query_ratio": {...},
...}`; never asserts.
Usage: `python bench/query_split.py [--preset tiny|small] [--repeats R]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import DDPMScheduler

import retrac.gradients as engine
from api_schemas import ProjectorSpec, QuerySpec
from retrac.conditions import Conditions
from retrac.gradients import GradientComputer, num_parameters
from retrac.losses import distance, noised
from retrac.models import DiffusionModel
from retrac.noise import query_noise
from retrac.projections import make_projector
from retrac.query_side import query_timesteps, query_vectors

sys.path.insert(0, str(Path(__file__).parent))
import gradients as gradient_bench

clock = time.process_time
Split = dict[str, float]
T = TypeVar("T")


def timed(split: Split, name: str, function: Callable[..., T]) -> Callable[..., T]:
    """`function`, adding its CPU time to `split[name]`."""

    def run(*args: object, **kwargs: object) -> T:
        start = clock()
        result = function(*args, **kwargs)
        split[name] += clock() - start
        return result

    return run


def plain_split(
    model: DiffusionModel, images: torch.Tensor, steps: torch.Tensor, noise: torch.Tensor
) -> Split:
    """The plain step (bench/gradients.py's), its forward and backward timed apart."""
    weights = [p for p in model.unet.parameters() if p.requires_grad]
    start = clock()
    value = distance(
        model.unet(noised(images, steps, noise, model.scheduler), steps).sample, noise, "mse"
    ).mean()
    middle = clock()
    torch.autograd.grad(value, weights)
    return {"forward": middle - start, "backward": clock() - middle}


def layerwise_split(
    computer: GradientComputer, images: torch.Tensor, steps: torch.Tensor, noise: torch.Tensor
) -> Split:
    """The layer-wise path chunk by chunk, its phases timed apart (the rules through `LAYER_RULES`)."""
    split: Split = defaultdict(float)
    rules = dict(engine.LAYER_RULES)
    engine.LAYER_RULES.update(
        {kind: timed(split, f"rule {kind.__name__}", rule) for kind, rule in rules.items()}
    )
    grad = torch.autograd.grad
    torch.autograd.grad = timed(split, "backward to layer outputs", grad)
    try:
        for start in range(0, images.shape[0], computer.chunk):
            part = slice(start, start + computer.chunk)
            batch = images[part].shape[0]
            began = clock()
            records = computer._layer_records(
                computer._layers, images[part], steps[part], noise[part], Conditions()
            )
            split["forward"] += clock() - began
            blocks = [
                (computer._starts[name], block.reshape(batch, -1))
                for name, block in engine._layer_gradients(computer._layers, records, batch)
            ]
            began = clock()
            sum(torch.linalg.vector_norm(block, dim=1).square() for _, block in blocks).sqrt()
            split["norms"] += clock() - began
            timed(split, "projection", computer.projector.project_blocks)(blocks, batch, computer.device)
    finally:
        torch.autograd.grad = grad
        engine.LAYER_RULES.update(rules)
    split["forward"] -= split["backward to layer outputs"]  # timed inside the records' call
    return split


WORK_OF_PATH = {"default": engine.GROUP_BACKWARD_WORK, "layerwise": float("inf"), "group_backward": 0}
"""`GROUP_BACKWARD_WORK` for each way a whole query is timed: as it runs, and forced down each path."""


def whole_query(computer: GradientComputer, image: torch.Tensor, query: QuerySpec) -> Split:
    """CPU seconds of `query_vectors` down each path of `WORK_OF_PATH`."""
    seconds: Split = {}
    try:
        for path, work in WORK_OF_PATH.items():
            engine.GROUP_BACKWARD_WORK = work
            start = clock()
            query_vectors(computer, image, query)
            seconds[path] = clock() - start
    finally:
        engine.GROUP_BACKWARD_WORK = WORK_OF_PATH["default"]
    return seconds


def summary(runs: list[tuple[Split, Split, Split]]) -> dict[str, object]:
    """Medians over repetitions of each figure as a fraction of the same repetition's plain step."""

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    plains = [sum(plain.values()) for plain, _, _ in runs]
    return {
        "plain_s": median(plains),
        "plain": {
            name: median([p[name] / s for (p, _, _), s in zip(runs, plains, strict=True)])
            for name in runs[0][0]
        },
        "layerwise": {
            name: median([lw[name] / s for (_, lw, _), s in zip(runs, plains, strict=True)])
            for name in runs[0][1]
        },
        "layerwise_ratio": median([sum(lw.values()) / s for (_, lw, _), s in zip(runs, plains, strict=True)]),
        "query_ratio": {
            path: median([w[path] / s for (_, _, w), s in zip(runs, plains, strict=True)])
            for path in WORK_OF_PATH
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    resolution, channels = gradient_bench.SHAPES[args.preset]
    model = DiffusionModel.from_parts(
        gradient_bench.build_denoiser(args.preset, None), DDPMScheduler(num_train_timesteps=1000)
    )
    projector = make_projector(ProjectorSpec(kind="sketch", dim=4096), num_parameters(model))
    computer = GradientComputer(model, "mse", projector)
    image = torch.randn(1, channels, resolution, resolution, generator=torch.Generator().manual_seed(0))
    result: dict[str, object] = {"preset": args.preset, "threads": 1, "clock": "cpu"}
    for query in gradient_bench.QUERIES:
        steps = query_timesteps(query.timesteps, model.num_timesteps)
        noise = query_noise(query.seed, query.timesteps, query.draws, image.shape[1:])
        copies = query.timesteps * query.draws
        flat = (image.expand(copies, -1, -1, -1), steps.repeat_interleave(query.draws), noise.flatten(0, 1))
        grouped = (image.expand(query.timesteps, -1, -1, -1), steps, noise)
        runs = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            plain = plain_split(model, *flat)
            layerwise = layerwise_split(computer, *grouped)
            runs.append((plain, layerwise, whole_query(computer, image, query)))
        result[f"K={query.timesteps},M={query.draws}"] = summary(runs[1:])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
