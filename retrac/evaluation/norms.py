"""Gradient norm against timestep: the cause of TracIn's bias (method.md section 5).

Views of one checkpoint:

- `recompute_slot_norms`: the exact norm of every training sample's stored slots (its replayed training step),
  computed batch by batch without keeping the gradients (for runs that were not indexed in memory).
- `norm_curves`: the norm of a few samples' gradients at every step of a timestep grid (one noise
  draw each), which locates `t_max`, the timestep where norms peak.
- `norm_fit`: the scatter's correlations and slope, the slope per unit t/T (the norm's change over
  the whole schedule). The one definition: `retrac eval norms` and the service's `GET .../norms` use it.
- `norm_timestep_statistics`: `norm_fit`, and the correlation of the norm with the distance of the
  training timestep to `t_max` (the paper's Fig. 1 statistic).
- `write_norm_figures`: the scatter and the curve as PNGs.
- `analyse_run`: all of it for one checkpoint of any `retrac train` run (`retrac eval norms`).
- `direction_figure`: several runs' mean norm curves, each relative to its own mean, on one plot (the
  direction of the bias under MSE and under L1, side by side).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from api_schemas import IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac import viz
from retrac.conditions import Conditions
from retrac.evaluation.metrics import Fit, fit
from retrac.evaluation.report import NormTimestepStatistics
from retrac.exceptions import EvaluationError
from retrac.gradients import GradientComputer
from retrac.plan import IndexPlan
from retrac.query_side import query_timesteps, query_vectors
from retrac.replay import TrainingRun


def recompute_slot_norms(
    plan: IndexPlan,
    checkpoint: int,
    computer: GradientComputer,
    *,
    on_progress: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, norms) `(N, S)` of every row's slots at `checkpoint`, in batches of the plan's size.

    `computer` must hold that checkpoint's model; its projection does not matter (norms are exact),
    and only one batch of gradients is alive at a time.
    """
    timesteps, norms = [], []
    for start in range(0, plan.num_rows, plan.spec.batch_size):
        rows = plan.compute_rows(checkpoint, slice(start, start + plan.spec.batch_size), computer)
        timesteps.append(rows.timesteps)
        norms.append(rows.norms)
        if on_progress is not None:
            on_progress(len(rows.norms))
    return torch.cat(timesteps), torch.cat(norms)


def norm_curves(
    computer: GradientComputer,
    images: torch.Tensor,
    grid: int,
    seed: int = 0,
    conditions: Conditions = Conditions(),
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps `(K,)`, norms `(n, K)`) of `images` (each under its row of `conditions`) at the grid
    `floor(linspace(1, T-1, K))`.

    Each norm is that of one gradient with one seeded noise draw: the query estimator with M = 1.
    """
    spec = QuerySpec(timesteps=grid, draws=1, seed=seed)
    vectors = query_vectors(computer, images, spec, conditions=conditions)
    steps = query_timesteps(grid, computer.model.num_timesteps)
    return steps.numpy(), vectors.timestep_norms.numpy()


def norm_fit(timesteps: np.ndarray, norms: np.ndarray, num_timesteps: int) -> Fit | None:
    """Correlations and least-squares line of norm on `t / T` over all (timestep, norm) pairs, any shape.

    None where undefined: fewer than 3 pairs, or a constant timestep or norm.
    """
    t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
    values = np.asarray(norms, dtype=np.float64).reshape(-1)
    if t.size < 3 or t.shape != values.shape or np.ptp(t) == 0 or np.ptp(values) == 0:
        return None
    return fit(t / num_timesteps, values)


def norm_timestep_statistics(
    timesteps: np.ndarray,
    norms: np.ndarray,
    curve_timesteps: np.ndarray,
    curve_norms: np.ndarray,
    *,
    num_timesteps: int,
    checkpoint_epoch: int,
) -> NormTimestepStatistics:
    """Statistics of the scatter `(timesteps, norms)` `(N,)`; `t_max` from the mean curve of `(n, K)`."""
    t = np.asarray(timesteps, dtype=np.float64)
    values = np.asarray(norms, dtype=np.float64)
    mean_curve = np.asarray(curve_norms, dtype=np.float64).mean(axis=0)
    t_max = int(curve_timesteps[int(np.argmax(mean_curve))])
    direct = norm_fit(t, values, num_timesteps)
    if direct is None:
        raise EvaluationError(f"norm vs timestep needs 3 or more pairs that vary in both, got {len(values)}")
    distance = fit(np.abs(t - t_max), values)
    return NormTimestepStatistics(
        checkpoint_epoch=checkpoint_epoch,
        samples=len(values),
        pearson=direct.pearson,
        spearman=direct.spearman,
        slope=direct.slope,
        relative_slope=direct.slope / float(values.mean()),
        t_max=t_max,
        distance_pearson=distance.pearson,
        distance_spearman=distance.spearman,
        curve_timesteps=[int(s) for s in curve_timesteps],
        curve_mean_norms=[float(v) for v in mean_curve],
    )


def write_norm_figures(
    out_dir: Path,
    timesteps: np.ndarray,
    norms: np.ndarray,
    groups: Sequence[str] | None,
    result: NormTimestepStatistics,
    curves: np.ndarray,
    first_label: str,
) -> list[str]:
    """`norm_timestep.png` (the scatter) and `norm_curve.png` (the first curve sample and the mean)."""
    viz.norm_scatter(
        out_dir / "norm_timestep.png",
        timesteps,
        norms,
        groups,
        t_max=result.t_max,
        title=f"replayed steps at epoch {result.checkpoint_epoch}: Spearman {result.spearman:.2f}",
    )
    viz.norm_curve(
        out_dir / "norm_curve.png",
        np.asarray(result.curve_timesteps),
        {first_label: curves[0], f"mean of {len(curves)} samples": curves.mean(axis=0)},
        title=f"norm over the timestep grid, epoch {result.checkpoint_epoch}",
    )
    return ["norm_timestep.png", "norm_curve.png"]


def analyse_run(
    run_folder: str | Path,
    out_dir: str | Path,
    *,
    epoch: int | None = None,
    curve_samples: int = 8,
    curve_timesteps: int = 100,
    seed: int = 0,
    on_progress: Callable[[int], object] | None = None,
) -> NormTimestepStatistics:
    """Norm vs timestep of every training sample's replayed step at the checkpoint saved after `epoch`
    (default: the last), for a `retrac train` run.

    Writes to `out_dir`: `norms.json` (the statistics, and under `per_sample` each sample's id,
    replayed timestep and norm, so the largest-norm samples can be named) and the two figures.
    """
    run = TrainingRun.load(run_folder)
    epochs = [c.epoch for c in run.checkpoints()]
    chosen = epochs[-1] if epoch is None else epoch
    if chosen not in epochs:
        raise EvaluationError(f"the run saved no checkpoint after epoch {chosen}; it has {epochs}")
    spec = IndexSpec(
        dataset=run.spec.dataset,
        run=str(run.folder),
        slots=SlotSpec(replay=True),
        projector=ProjectorSpec(kind="identity"),
    )
    plan = IndexPlan.resolve(spec)
    checkpoint = epochs.index(chosen)
    computer = GradientComputer(plan.load_model(checkpoint), plan.loss, chunk=spec.batch_size)
    timesteps, norms = (
        v[:, 0].numpy() for v in recompute_slot_norms(plan, checkpoint, computer, on_progress=on_progress)
    )
    shown = slice(0, curve_samples)
    grid, curves = norm_curves(computer, plan.inputs[shown], curve_timesteps, seed, plan.conditions(shown))
    result = norm_timestep_statistics(
        timesteps, norms, grid, curves, num_timesteps=plan.num_timesteps, checkpoint_epoch=int(chosen or 0)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_sample = {"ids": list(plan.dataset.ids), "timesteps": timesteps.tolist(), "norms": norms.tolist()}
    saved = result.model_dump(mode="json") | {"per_sample": per_sample}
    (out / "norms.json").write_text(json.dumps(saved, indent=1) + "\n")
    write_norm_figures(out, timesteps, norms, plan.dataset.groups, result, curves, plan.dataset.ids[0])
    return result


def direction_figure(
    path: str | Path, statistics: Mapping[str, NormTimestepStatistics], *, title: str
) -> Path:
    """One PNG of each labelled run's mean norm curve divided by its own mean.

    Losses scale gradients differently (an L1 gradient is bounded per pixel, an MSE one grows with the
    error), so only relative curves can share an axis; the direction is what they compare.
    """
    if not statistics:
        raise EvaluationError("a direction figure needs at least one run")
    grids = {tuple(s.curve_timesteps) for s in statistics.values()}
    if len(grids) != 1:
        raise EvaluationError("runs compared on one figure need the same curve grid (curve_timesteps)")
    curves = {
        f"{label} (Spearman {s.spearman:+.2f})": np.asarray(s.curve_mean_norms) / np.mean(s.curve_mean_norms)
        for label, s in statistics.items()
    }
    return viz.norm_curve(path, np.asarray(grids.pop()), curves, title=title, ylabel="norm / its mean")
