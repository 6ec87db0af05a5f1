"""Do attributions find what they should? Prints one JSON object of quality figures per method and estimator.

    .venv/bin/python bench/quality.py --quick      # under 10 minutes on 2 CPU cores
    .venv/bin/python bench/quality.py --quick --parts stability --curve 8,1 8,2 8,4 16,1 32,1

Trains a tiny DDPM on real digits (with a replay record), then measures, per method (`tracin`,
`retrac`, `trak` and, from output-norm rows, `dtrak`; kernels of the slots scored) and estimator
(`paper`: the replayed step against the query's mean over timesteps; `matched`: shared-noise grid
slots paired with the query per timestep):

- `retrieval`: `self_retrieval_top1` (a training image ranks itself first) and `near_duplicate_top3`
  (a 1-pixel shift, JPEG q75 or noise of std 0.02 ranks its source in the top 3), per kind.
- `copies`: a `micro` model trained long on 64 digits at 8 px (4,000 full-batch steps; `--quick`'s
  1,000 memorise nothing); generated images within `COPY_RMS` of a training image are copies,
  `copy_top3` the share ranking it in their top 3 (null: none), `nearest_top3` over all generated.
- `stability` (loss rows: tracin, retrac, trak): two slot seeds (matched) or query seeds (paper):
  `seed_stability_top10`, `seed_stability_spearman` on held-out queries, and a curve over (K, M).
- `lds`, `self_influence`, `norm_direction`: the counterfactual and outlier parts of `bench/lds.py`
  (their own models and data): `lds`, `lds_ci` (validation), `lds_generated`, `lds_generated_ci` per
  method and estimator (pixel-cosine: estimator `baseline`), `generally_influential_ratio`; `removal`,
  `self_influence_auc` (trak and dtrak among its scores) and `norm_direction` at the top.

Each part is a function of the shared `Setup` giving {method: {estimator: {key: value}}}, timed into
`wall_s` and `cpu_s` (never asserted). Figures: docs/experiment.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from api_schemas import (
    DatasetSpec,
    IndexSpec,
    KernelSpec,
    Method,
    OutputFunction,
    ProjectorSpec,
    QuerySpec,
    SlotSpec,
    TrainSpec,
)
from retrac.attribution import Attributor
from retrac.datasets import ImageDataset, load_dataset
from retrac.evaluation import retrieval
from retrac.evaluation.sampling import generate
from retrac.methods import ROWS
from retrac.plan import IndexPlan, Rows
from retrac.query_side import QueryVectors
from retrac.replay import TrainingRun
from retrac.scoring import RowChunk, matched_slots
from retrac.training import train

sys.path.insert(0, str(Path(__file__).parent))
import lds as counterfactual  # noqa: E402  (bench/lds.py, beside this file)


@dataclass(frozen=True)
class Setting:
    """The sizes of one run of the bench."""

    quick: bool
    """Whether bench/lds.py's parts run their quick settings too."""
    train: int
    heldout: int
    resolution: int
    epochs: int
    save_every: int
    last_checkpoint_only: bool
    timesteps: int
    draws: int
    sketch: int
    retrieval_queries: int
    curve: tuple[tuple[int, int], ...]
    copy_train: int
    copy_resolution: int
    copy_preset: str
    copy_batch: int
    copy_lr: float
    copy_epochs: int
    copy_samples: int


QUICK = Setting(
    quick=True, train=128, heldout=32, resolution=16, epochs=40, save_every=20, last_checkpoint_only=True,
    timesteps=16, draws=1, sketch=4096, retrieval_queries=32, curve=((8, 1), (8, 2), (16, 1)),
    copy_train=64, copy_resolution=8, copy_preset="micro", copy_batch=64, copy_lr=3e-3, copy_epochs=1000,
    copy_samples=64,
)
FULL = Setting(
    quick=False, train=320, heldout=64, resolution=16, epochs=60, save_every=20, last_checkpoint_only=False,
    timesteps=16, draws=1, sketch=4096, retrieval_queries=64,
    curve=((4, 1), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2), (32, 1)),
    copy_train=64, copy_resolution=8, copy_preset="micro", copy_batch=64, copy_lr=3e-3, copy_epochs=4000,
    copy_samples=128,
)
"""The recommended setting is K = 16 grid slots of M = 1 draw each: the cheapest point of the measured
curve whose matched ReTrac rankings are stable (docs/experiment.md). Averaging M draws into one slot
estimates the cosine of the mean gradients, another quantity than the mean cosine over draws that
more timesteps of one draw each estimate, so M > 1 costs as much as more K and is less stable.
The copies part trains the `micro` UNet at the digits' own 8 px, one full batch per step: a model
memorises 64 images within a few thousand steps there, which 2 CPU cores can afford."""

COPY_RMS = 0.05
"""A generated image is a copy of its nearest training image when their RMS pixel distance (on the
[0, 1] scale) is at most this: about 13 grey levels of 256 per pixel on average."""

SEEDS = (11, 12)
"""The two slot (and query) seeds of the stability part; the first is the retrieval part's."""

Figures = dict[str, dict[str, dict[str, Any]]]
"""{method: {estimator: {key: value}}}."""

ROW_KINDS: tuple[OutputFunction, ...] = ("loss", "output-norm")
"""The indexes a part builds to score every method: loss rows (tracin, retrac, trak), output-norm
rows (dtrak)."""

KERNEL = KernelSpec()
"""The kernel trak and dtrak are preconditioned by, built over the slots each estimator scores."""


@dataclass(frozen=True)
class Setup:
    """What every part shares: the setting, the trained run, its training images, held-out digits,
    a scratch folder (for parts that train runs of their own) and the report's top-level figures."""

    setting: Setting
    run: TrainingRun
    data: DatasetSpec
    train: ImageDataset
    heldout: torch.Tensor
    scratch: Path
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level figures of parts that are not per method and estimator."""

    def attributor(
        self, grid: int, draws: int, seed: int, run: TrainingRun | None = None, rows: OutputFunction = "loss"
    ) -> Attributor:
        """An in-memory index of `run` (default: the shared one) of `rows`, replayed step plus `grid`
        shared-noise grid slots of `draws` noises, computed at once."""
        run = run or self.run
        checkpoints = run.checkpoints()[-1:] if self.setting.last_checkpoint_only else ()
        spec = IndexSpec(
            dataset=run.spec.dataset, run=str(run.folder), checkpoints=tuple(checkpoints),
            slots=SlotSpec(replay=True, grid=grid, noise="shared", draws=draws, seed=seed),
            projector=ProjectorSpec(kind="sketch", dim=self.setting.sketch, seed=0), output_function=rows,
        )
        attributor = Attributor(IndexPlan.resolve(spec))
        attributor.index()
        return attributor


def train_digits(
    count: int, resolution: int, folder: Path, **recipe: Any
) -> tuple[TrainingRun, ImageDataset]:
    """A DDPM (mse) trained on the first `count` digits with `recipe` (TrainSpec fields: preset,
    epochs, batch_size, lr, save_every), with its replay record."""
    data = DatasetSpec(source="builtin:digits", resolution=resolution, limit=count)
    training = load_dataset(data)
    spec = TrainSpec(dataset=data, loss="mse", seed=0, **recipe)
    return train(spec, training, folder), training


def prepare(setting: Setting, folder: Path) -> tuple[Setup, float]:
    """Train the shared run (the first `setting.train` digits); the next `setting.heldout` are held out."""
    started = time.perf_counter()
    run, training = train_digits(setting.train, setting.resolution, folder / "run", preset="tiny",
                                 epochs=setting.epochs, batch_size=32, lr=1e-3, save_every=setting.save_every)
    everything = load_dataset(run.spec.dataset.model_copy(update={"limit": setting.train + setting.heldout}))
    setup = Setup(setting, run, run.spec.dataset, training, everything.images[setting.train :], folder)
    return setup, time.perf_counter() - started


def scores(attributor: Attributor, vectors: list[QueryVectors], estimator: str) -> dict[Method, np.ndarray]:
    """`(Q, N)` score matrices of every method the index's rows serve: `paper` over the replayed slot,
    `matched` over the grid slots, `paper_over_shared_slots` the paper's form over the grid slots (the
    ablation); trak and dtrak by the kernel of the slots scored, as an index of those slots builds it."""
    rows: list[Rows] = attributor.rows  # type: ignore[assignment]
    spec = attributor.plan.spec
    grid = matched_slots(spec.slots)
    chosen = {"paper": slice(0, 1), "matched": slice(None), "paper_over_shared_slots": grid}[estimator]
    chunks = [RowChunk(r.projected[:, chosen], r.norms[:, chosen]) for r in rows]
    methods = [m for m, function in ROWS.items() if function == spec.output_function]
    return retrieval.full_scores(
        chunks, vectors, attributor.plan.weights, matched=grid if estimator == "matched" else None,
        methods=methods, kernel=KERNEL,
    )


def every_method(
    setup: Setup,
    slots: tuple[int, int, int],
    images: torch.Tensor,
    estimators: tuple[str, ...],
    *,
    run: TrainingRun | None = None,
    kinds: tuple[OutputFunction, ...] = ROW_KINDS,
) -> dict[str, dict[Method, np.ndarray]]:
    """{estimator: {method: `(Q, N)`}} of `images` over one index per row kind of `kinds`, each with
    `slots` = (grid, draws, seed), queried with the index's own K, M and seed."""
    out: dict[str, dict[Method, np.ndarray]] = {e: {} for e in estimators}
    for kind in kinds:
        attributor = setup.attributor(*slots, run=run, rows=kind)
        vectors = query(attributor, images)
        for estimator in estimators:
            out[estimator].update(scores(attributor, vectors, estimator))
    return out


def query(attributor: Attributor, images: torch.Tensor) -> list[QueryVectors]:
    """Query vectors at every checkpoint with the index's own K, M and seed."""
    slots = attributor.plan.spec.slots
    spec = QuerySpec(timesteps=slots.grid, draws=slots.draws, seed=slots.seed)
    return attributor.query_vectors(images, spec, list(range(len(attributor.plan.checkpoints))))


def retrieval_part(setup: Setup) -> Figures:
    """Training images as queries (top-1 self) and their near-duplicates (source in the top 3)."""
    setting = setup.setting
    own = list(range(setting.retrieval_queries))
    originals = setup.train.images[own]
    duplicates = {
        "shift": retrieval.shifted(originals),
        "jpeg": retrieval.jpeg_reencoded(originals, quality=75),
        "noise": retrieval.noised(originals, std=0.02, seed=1),
    }
    images = torch.cat([originals, *duplicates.values()])
    estimators = ("paper", "matched", "paper_over_shared_slots")
    found = every_method(setup, (setting.timesteps, setting.draws, SEEDS[0]), images, estimators)
    out: Figures = {}
    for estimator, by_method in found.items():
        for method, table in by_method.items():
            parts = np.split(table, 1 + len(duplicates))
            by_kind = {
                kind: retrieval.hit_rate(part, own, 3)
                for kind, part in zip(duplicates, parts[1:], strict=True)
            }
            out.setdefault(method, {})[estimator] = {
                "self_retrieval_top1": retrieval.hit_rate(parts[0], own, 1),
                "near_duplicate_top3": retrieval.hit_rate(
                    np.concatenate(parts[1:]), own * len(duplicates), 3
                ),
                "near_duplicate_top3_by_kind": by_kind,
            }
    return out


def stability_part(setup: Setup) -> Figures:
    """Agreement of two indexes (matched) or two query seeds (paper) on held-out queries, per (K, M),
    of the methods of loss rows (dtrak's output-norm index would double the part's cost)."""
    curve: dict[Method, dict[str, list[dict[str, float]]]] = {}
    for grid, draws in setup.setting.curve:
        tables = [
            every_method(setup, (grid, draws, seed), setup.heldout, ("paper", "matched"), kinds=("loss",))
            for seed in SEEDS
        ]
        for estimator, by_method in tables[0].items():
            for method, first in by_method.items():
                second = tables[1][estimator][method]
                curve.setdefault(method, {}).setdefault(estimator, []).append({
                    "grid": grid, "draws": draws,
                    "top10": retrieval.top_k_overlap(first, second, 10),
                    "spearman": retrieval.mean_spearman(first, second),
                })
    chosen = (setup.setting.timesteps, setup.setting.draws)
    out: Figures = {}
    for method, per_estimator in curve.items():
        for estimator, points in per_estimator.items():
            at = next((p for p in points if (p["grid"], p["draws"]) == chosen), {})  # None: not on the curve
            out.setdefault(method, {})[estimator] = {
                "seed_stability_top10": at.get("top10"),
                "seed_stability_spearman": at.get("spearman"),
                "seed_stability_curve": points,
            }
    return out


def copy_part(setup: Setup) -> Figures:
    """A model trained long on a few digits memorises them: its generated near-copies (nearest
    training image within `COPY_RMS`) should retrieve that image in their top 3."""
    setting = setup.setting
    epochs = setting.copy_epochs
    run, training = train_digits(
        setting.copy_train, setting.copy_resolution, setup.scratch / "copies", preset=setting.copy_preset,
        epochs=epochs, batch_size=setting.copy_batch, lr=setting.copy_lr, save_every=epochs,  # one checkpoint
    )
    return copy_figures(setup, run, training)


def copy_figures(setup: Setup, run: TrainingRun, training: ImageDataset) -> Figures:
    """The copies part's figures for a trained `run` on `training`, generated by its last checkpoint."""
    setting = setup.setting
    plan = IndexPlan.resolve(IndexSpec(dataset=run.spec.dataset, run=str(run.folder)))
    model = plan.load_model(len(plan.checkpoints) - 1)
    generated = generate(model.unet, model.scheduler, setting.copy_samples, sampler="ddim", steps=50, seed=3)
    nearest, rms = retrieval.nearest_training(generated, training.images)
    copies = np.flatnonzero(rms <= COPY_RMS)
    found = {
        "copies_found": int(len(copies)), "copy_generated": setting.copy_samples,
        "copy_rms_quartiles": [float(v) for v in np.quantile(rms, [0.25, 0.5, 0.75])],
        "copy_epochs": run.spec.epochs,
    }
    slots = (setting.timesteps, setting.draws, SEEDS[0])
    out: Figures = {}
    for estimator, by_method in every_method(setup, slots, generated, ("paper", "matched"), run=run).items():
        for method, table in by_method.items():
            out.setdefault(method, {})[estimator] = {
                **found,
                "copy_top3": retrieval.hit_rate(table[copies], nearest[copies].tolist(), 3)
                if len(copies)
                else None,
                "nearest_top3": retrieval.hit_rate(table, nearest.tolist(), 3),
            }
    return out


def lds_part(setup: Setup) -> Figures:
    """bench/lds.py's LDS and removal check, laid out per method and estimator."""
    found = counterfactual.lds_part(setup.scratch, quick=setup.setting.quick)
    out: Figures = {}
    for split, by_method in found["lds"].items():
        suffix = "" if split == "validation" else f"_{split}"  # validation queries: plain `lds`
        for method, per_estimator in by_method.items():
            for estimator, value in per_estimator.items():
                out.setdefault(method, {}).setdefault(estimator, {}).update({
                    f"lds{suffix}": value, f"lds{suffix}_ci": found["lds_ci"][split][method][estimator],
                })
    for estimator, ratio in found["generally_influential_ratio"].items():
        out.setdefault("retrac", {}).setdefault(estimator, {})["generally_influential_ratio"] = ratio
    setup.extra.update(removal=found["removal"], lds_setting=found["lds_setting"])
    return out


def self_influence_part(setup: Setup) -> Figures:
    """bench/lds.py's outlier detection on both planted mixtures (no query estimator involved)."""
    found = counterfactual.self_influence_part(setup.scratch, quick=setup.setting.quick)
    setup.extra.update(self_influence_auc=found["self_influence_auc"])
    return {}


def norm_direction_part(setup: Setup) -> Figures:
    """bench/lds.py's norm-vs-timestep direction under MSE and L1 on the paper's schedule."""
    found = counterfactual.norm_direction_part(setup.scratch, quick=setup.setting.quick)
    setup.extra.update(norm_direction=found["norm_direction"])
    return {}


PARTS: dict[str, Callable[[Setup], Figures]] = {
    "retrieval": retrieval_part, "stability": stability_part, "copies": copy_part,
    "lds": lds_part, "self_influence": self_influence_part, "norm_direction": norm_direction_part,
}
"""Every part of the bench, in the order they run."""


def merge(into: Figures, figures: Figures) -> None:
    """Add one part's figures to the report, method by method and estimator by estimator."""
    for method, per_estimator in figures.items():
        for estimator, values in per_estimator.items():
            into.setdefault(method, {}).setdefault(estimator, {}).update(values)


def grid_and_draws(text: str) -> tuple[int, int]:
    """`K,M` from the command line."""
    try:
        grid, draws = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,M (two integers), got {text!r}") from None
    return grid, draws


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the smaller setting (under 10 minutes on 2 cores)"
    )
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS), help="parts to run")
    parser.add_argument("--curve", nargs="+", type=grid_and_draws, metavar="K,M",
                        help="the stability part's (grid slots, draws) points instead of the setting's")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one thread: two contending processes run torch far slower on 2 cores
    setting = QUICK if args.quick else FULL
    if args.curve:
        setting = replace(setting, curve=tuple(args.curve))
    with tempfile.TemporaryDirectory() as folder:
        setup, train_s = prepare(setting, Path(folder))
        report: dict[str, Any] = {"setting": asdict(setting), "wall_s": {"train": train_s}, "cpu_s": {}}
        figures: Figures = {}
        for name in args.parts:
            started, used = time.perf_counter(), time.process_time()
            merge(figures, PARTS[name](setup))
            report["wall_s"][name] = time.perf_counter() - started
            report["cpu_s"][name] = time.process_time() - used
    print(json.dumps({**report, **setup.extra, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
