"""Counterfactual and outlier evidence: LDS with the removal check, self-influence outlier detection,
and the direction of the norm-vs-timestep bias under MSE and under L1; prints one JSON object.

    .venv/bin/python bench/lds.py --quick --out out/lds --figures docs/figures
    .venv/bin/python bench/lds.py --preset standard --out /work/lds-cache   # resumes when rerun

Parts (each a function returning a dict with its wall time, so bench/quality.py can call them):

- `lds_part`: `retrac.evaluation.lds.run_lds` (32 models on random halves in --quick, 64 in the
  standard preset): `lds` and `lds_ci` per query split, method and estimator, `self_retrieval`,
  `seed_variance`, `removal`, and `generally_influential_ratio` (ReTrac's count
  over TracIn's, per estimator, on the same full model).
- `curve_part` (`--parts curve`, not run by default): the quality-per-byte curve, LDS and
  self-retrieval of every method and estimator against the rows per sample (the replayed step plus
  K = 0..32 shared-noise grid slots), which chose `index create`'s default slots.
- `self_influence_part`: `retrac.evaluation.outliers.detect_outliers` on both planted mixtures:
  `self_influence_auc` per mixture and method.
- `norm_direction_part`: two runs of the paper's recipe (cosine betas clipped to [1e-4, 0.02],
  T = 1000) that differ only in the loss; Spearman of norm with timestep and where norms peak, and
  the figure `norm_direction.png` with both relative curves.

Timings are for orientation only; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from api_schemas import DatasetSpec, SlotSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.evaluation.lds import LDS_PRESETS, matched_slots_for, run_lds
from retrac.evaluation.norms import analyse_run, direction_figure
from retrac.evaluation.outliers import MIXES, OutlierConfig, detect_outliers
from retrac.training import RECIPES, train


def lds_part(out: Path, quick: bool, preset: str | None = None) -> dict[str, Any]:
    config = LDS_PRESETS[preset or ("quick" if quick else "standard")]()
    began = time.perf_counter()
    report = run_lds(config, out / "lds", progress=True)
    counts = report.generally_influential
    return {
        "lds": report.lds,
        "lds_ci": report.lds_ci,
        "self_retrieval": report.self_retrieval,
        "seed_variance": {s: v.model_dump() for s, v in (report.seed_variance or {}).items()} or None,
        "bytes_per_sample": report.bytes_per_sample,
        "skipped": report.skipped,
        "removal": report.removal.model_dump() if report.removal else None,
        "generally_influential": counts,
        "generally_influential_ratio": {
            estimator: counts["retrac"][estimator] / counts["tracin"][estimator]
            if counts["tracin"][estimator]
            else None
            for estimator in counts["tracin"]
        },
        "lds_setting": {"models": config.models, "n_train": config.n_train, "n_queries": config.n_queries,
                        "n_generated": config.n_generated, "sources": list(config.sources),
                        "preset": config.preset, "resolution": config.resolution, "epochs": config.epochs},
        "lds_timings": report.timings,
        "lds_wall_s": round(time.perf_counter() - began, 1),
    }


def self_influence_part(out: Path, quick: bool) -> dict[str, Any]:
    began = time.perf_counter()
    results = {}
    for mix in MIXES:
        config = OutlierConfig(mix=mix) if quick else OutlierConfig(mix=mix, n_train=1000, epochs=40)
        results[mix] = detect_outliers(config, out / "outliers" / mix.replace("+", "-"))
    return {
        "self_influence_auc": {mix: r.auc for mix, r in results.items()},
        "self_influence_recall": {mix: r.recall for mix, r in results.items()},
        "self_influence_setting": {
            mix: {"samples": r.samples, "outliers": r.outliers} for mix, r in results.items()
        },
        "self_influence_wall_s": round(time.perf_counter() - began, 1),
    }


def norm_direction_part(out: Path, quick: bool) -> dict[str, Any]:
    began = time.perf_counter()
    data = DatasetSpec(source="builtin:digits", resolution=8, limit=128 if quick else 512)
    images = load_dataset(data)
    recipe = RECIPES["paper"].train
    statistics = {}
    for loss in ("mse", "l1"):
        spec = TrainSpec(dataset=data, preset="micro", epochs=20 if quick else 40, batch_size=32, lr=2e-3,
                         save_every=10, **(recipe | {"loss": loss}))
        run = train(spec, images, out / "norms" / loss / "run")
        statistics[loss.upper()] = analyse_run(run.folder, out / "norms" / loss, curve_samples=8,
                                               curve_timesteps=50)
    figure = direction_figure(out / "norm_direction.png", statistics,
                              title="norm vs timestep, paper schedule: MSE vs L1")
    return {
        "norm_direction": {
            label: {"spearman": s.spearman, "pearson": s.pearson, "t_max": s.t_max, "samples": s.samples}
            for label, s in statistics.items()
        },
        "norm_direction_figure": str(figure),
        "norm_direction_wall_s": round(time.perf_counter() - began, 1),
    }


CURVE_GRIDS = (0, 2, 4, 8, 16, 32)
"""Shared-noise grid slots per sample of the quality-per-byte curve (0: the replayed step alone)."""


def curve_part(out: Path, quick: bool, preset: str | None = None, grids: tuple[int, ...] = CURVE_GRIDS
               ) -> dict[str, Any]:
    """LDS and self-retrieval against the rows each sample keeps: the preset's data, models and loss
    measurement (so the retrained models are shared by every point), indexed with the replayed step
    and K shared-noise grid slots of one draw each, queried at the same K (M = 1)."""
    base = LDS_PRESETS[preset or ("quick" if quick else "standard")]()
    began = time.perf_counter()
    points = []
    for grid in grids:
        query = base.query.model_copy(update={"timesteps": max(grid, 1), "draws": 1})
        slots = matched_slots_for(query) if grid else SlotSpec(replay=True)
        config = base.model_copy(update={"slots": slots, "query": query, "removal_queries": 0})
        report = run_lds(config, out / "lds", progress=True)
        points.append({"grid": grid, "rows_per_sample": len(slots.kinds),
                       "bytes_per_sample": report.bytes_per_sample, "lds": report.lds,
                       "lds_ci": report.lds_ci,
                       "self_retrieval": report.self_retrieval,
                       "skipped": report.skipped, "attribute_s": report.timings["attribute"]})
    return {"curve": points, "curve_wall_s": round(time.perf_counter() - began, 1)}


PARTS = {"lds": lds_part, "self_influence": self_influence_part, "norm_direction": norm_direction_part,
         "curve": curve_part}
DEFAULT_PARTS = ("lds", "self_influence", "norm_direction")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the small setting (under 10 minutes on 2 cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/lds"), help="working folder")
    parser.add_argument("--figures", type=Path, help="also copy norm_direction.png here (e.g. docs/figures)")
    parser.add_argument("--preset", choices=sorted(LDS_PRESETS),
                        help="the LDS part's preset (standard: the benchmark); alone, runs the LDS part only")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS),
                        help=f"parts to run (default: {', '.join(DEFAULT_PARTS)}; lds alone with --preset)")
    args = parser.parse_args(argv)
    parts = args.parts or (["lds"] if args.preset else list(DEFAULT_PARTS))

    torch.set_num_threads(1)  # one thread: contending processes run torch far slower on 2 cores
    began = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "preset": args.preset}
    for name in parts:
        if name == "lds":
            result |= lds_part(args.out, args.quick, args.preset)
        elif name == "curve":
            result |= curve_part(args.out, args.quick, args.preset)
        else:
            result |= PARTS[name](args.out, args.quick)
    if args.figures is not None and "norm_direction_figure" in result:
        args.figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["norm_direction_figure"], args.figures / "norm_direction.png")
    result["wall_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
