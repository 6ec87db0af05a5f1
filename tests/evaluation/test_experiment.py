"""The outlier-model experiment end to end on a very small configuration, and its score matrices
against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from api_schemas import IndexSpec, ProjectorSpec, QuerySpec, SlotSpec
from retrac.attribution import Attributor
from retrac.evaluation.experiment import ExperimentConfig, build_data, replay_scores, run_experiment
from retrac.evaluation.report import Report, headline_table
from retrac.plan import IndexPlan
from tests.conftest import TINY_DATASET

METHOD_KEYS = {
    "u_at_k",
    "generally_influential",
    "precision_at_k",
    "outlier_intrusion",
    "query_self_rank",
    "self_influence_recall",
    "self_influence_auc",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, dict]:
    """The smoke preset (micro UNet, 8 px, 44 training samples), run once for the module."""
    out = tmp_path_factory.mktemp("experiment")
    report = run_experiment(ExperimentConfig.smoke(), out, progress=False)
    return report, {"out": out, "json": json.loads((out / "report.json").read_text())}


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_report_has_every_metric_for_both_methods(smoke) -> None:
    report, saved = smoke
    config = ExperimentConfig.smoke()
    for method in ("tracin", "retrac"):
        metrics = saved["json"][method]
        assert set(metrics) == METHOD_KEYS
        assert set(metrics["precision_at_k"]) == {"majority", "outlier"}
        for key in ("u_at_k", "outlier_intrusion", "self_influence_recall", "self_influence_auc"):
            assert 0 <= metrics[key] <= 1
        ranks = metrics["query_self_rank"]["ranks"]
        assert len(ranks) == config.queries.train_majority + config.queries.train_outliers
        assert all(1 <= r <= config.n_majority + config.n_outliers for r in ranks)
        assert metrics["generally_influential"]["count"] == len(metrics["generally_influential"]["samples"])
    assert {"pearson", "spearman", "slope"} <= set(saved["json"]["norm_timestep"])
    assert saved["json"]["norm_timestep"]["samples"] == config.n_majority + config.n_outliers
    assert len(saved["json"]["queries"]) == sum(config.queries.model_dump().values())
    assert saved["json"]["setup"]["group_sizes"] == {"majority": 40, "outlier": 4}
    assert Report.model_validate(saved["json"]) == report


def test_every_number_in_the_report_is_finite(smoke) -> None:
    numbers = _numbers(smoke[1]["json"])
    assert len(numbers) > 50
    assert all(math.isfinite(n) for n in numbers)


def test_figures_and_markdown_are_written(smoke) -> None:
    report, saved = smoke
    assert report.figures == ["gallery.png", "norm_timestep.png", "norm_curve.png"]
    for name in report.figures:
        data = (saved["out"] / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert 2_000 < len(data) < 300_000
    markdown = (saved["out"] / "report.md").read_text()
    assert headline_table(report) in markdown
    assert "| U@3 over 10 queries" in markdown
    assert "![gallery.png](gallery.png)" in markdown


def test_build_data_keeps_queries_apart_from_training(tmp_path) -> None:
    config = ExperimentConfig.smoke()
    data = build_data(config, tmp_path)
    assert len(data.train) == 44
    assert data.train.groups.count("outlier") == 4
    assert data.kinds == ("heldout",) * 5 + ("train",) * 3
    assert data.queries.groups[:5] == ("majority",) * 3 + ("outlier",) * 2
    trained = [row for row in data.own_rows if row is not None]
    assert [data.train.groups[row] for row in trained] == ["majority", "majority", "outlier"]
    torch.testing.assert_close(data.queries.images[5:], data.train.images[trained])
    held = data.queries.images[:5].flatten(1)
    assert (
        torch.cdist(held, data.train.images.flatten(1)).min() > 0
    )  # held-out images are not training images


def test_replay_scores_match_a_loop_and_the_engine_on_a_replay_only_index(tiny_run) -> None:
    """Scores from the replayed slot of a replay+grid index equal (a) a direct sum over checkpoints and
    (b) the engine's own ranking on an index that holds only the replayed slot."""

    def plan(grid: int) -> IndexPlan:
        slots = SlotSpec(replay=True, grid=grid, seed=2)
        return IndexPlan.resolve(
            IndexSpec(
                dataset=TINY_DATASET,
                run=str(tiny_run.folder),
                slots=slots,
                projector=ProjectorSpec(kind="identity"),
            )
        )

    with_grid = Attributor(plan(3))
    rows = with_grid.index()
    images = with_grid.plan.dataset.images[[3, 30]]
    spec = QuerySpec(timesteps=5, draws=2, seed=1)
    vectors = with_grid.query_vectors(images, spec, [0, 1, 2])
    scores = replay_scores(rows, vectors, with_grid.plan.weights)

    for method in ("tracin", "retrac"):
        expected = np.zeros((2, 48))
        for c, weight in enumerate(with_grid.plan.weights):
            g = rows[c].projected[:, 0].double()
            if method == "retrac":
                g = g / rows[c].norms[:, 0].double().unsqueeze(1)
            expected += weight * (getattr(vectors[c], method).double() @ g.T).numpy()
        np.testing.assert_allclose(scores[method], expected, rtol=1e-4, atol=1e-9)

    replay_only = plan(0)
    results = Attributor(replay_only).attribute(images, spec, top_k=5)
    for q, result in enumerate(results):
        for method in ("tracin", "retrac"):
            ranked = result.methods[method].proponents
            assert [replay_only.dataset.ids.index(i.sample_id) for i in ranked] == np.argsort(
                -scores[method][q], kind="stable"
            )[:5].tolist()
            np.testing.assert_allclose(
                [i.score for i in ranked], np.sort(scores[method][q])[::-1][:5], rtol=1e-4
            )
