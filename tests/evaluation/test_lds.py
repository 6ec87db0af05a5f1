"""The LDS harness: its statistics against scipy and hand-computed numbers, the retrained models'
losses against an in-process recomputation, and the whole harness once on its smallest setting."""

from __future__ import annotations

import json
import shutil
import typing

import numpy as np
import pytest
import torch
from scipy import stats

from api_schemas import DatasetSpec, QuerySpec
from retrac.datasets import load_dataset
from retrac.evaluation import metrics
from retrac.evaluation.lds import (
    SPLITS,
    LdsConfig,
    LdsReport,
    run_lds,
    seed_variance,
    split_data,
    train_spec,
)
from retrac.evaluation.lds_scores import BASELINE, DEFAULT_ESTIMATOR, pixel_cosine, query_estimators
from retrac.evaluation.retraining import RetrainJob, query_losses, random_subsets, train_and_measure
from retrac.exceptions import EvaluationError
from retrac.methods import ROWS
from retrac.models import DiffusionModel, load_scheduler, load_unet
from retrac.replay import TrainingRun
from tests.tolerances import gamma

torch.set_num_threads(1)


def test_lds_of_hand_computed_ranks() -> None:
    # Query 0: ranks (1, 2, 3, 4) vs (1, 3, 2, 4): 1 - 6 * 2 / (4 * 15) = 0.8.
    # Query 1: predicted order reversed: -1.
    actual = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]])
    predicted = np.array([[10.0, 4.0], [30.0, 3.0], [20.0, 2.0], [40.0, 1.0]])
    assert metrics.lds_per_query(actual, predicted) == pytest.approx([0.8, -1.0], abs=1e-12)


def test_lds_matches_scipy_spearman_with_ties() -> None:
    rng = np.random.default_rng(3)
    actual = rng.integers(0, 5, size=(12, 7)).astype(float)  # many ties
    predicted = rng.normal(size=(12, 7))
    predicted[:6, 2] = 0.5  # ties on the predicted side too
    expected = [stats.spearmanr(actual[:, q], predicted[:, q]).statistic for q in range(7)]
    assert metrics.lds_per_query(actual, predicted) == pytest.approx(expected, abs=1e-12)


def test_lds_refuses_a_query_whose_loss_never_changes() -> None:
    actual = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]])
    with pytest.raises(EvaluationError, match=r"queries \[0\] have the same"):
        metrics.lds_per_query(actual, np.arange(6.0).reshape(3, 2))


def test_subset_predictions_are_minus_the_summed_scores_of_the_kept_samples() -> None:
    rng = np.random.default_rng(0)
    scores, masks = rng.normal(size=(3, 9)), rng.random((5, 9)) < 0.5
    expected = np.array(
        [[-sum(scores[q, i] for i in range(9) if masks[m, i]) for q in range(3)] for m in range(5)]
    )
    assert metrics.subset_predictions(scores, masks) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_interval_is_the_documented_percentile_rule() -> None:
    values = np.array([0.1, 0.5, -0.2, 0.3, 0.9, 0.0])
    rng = np.random.default_rng(11)
    means = [values[rng.integers(0, 6, 6)].mean() for _ in range(200)]
    expected = (np.quantile(means, 0.05), np.quantile(means, 0.95))
    assert metrics.bootstrap_interval(values, resamples=200, confidence=0.9, seed=11) == pytest.approx(
        expected
    )


def test_bootstrap_interval_agrees_with_scipy() -> None:
    values = np.random.default_rng(5).normal(0.3, 0.2, size=40)
    ours = metrics.bootstrap_interval(values, resamples=20_000, confidence=0.95, seed=0)
    theirs = stats.bootstrap(
        (values,), np.mean, n_resamples=20_000, confidence_level=0.95, method="percentile", random_state=1
    ).confidence_interval
    # Monte Carlo error of a 2.5% quantile of 20,000 resampled means: a few hundredths of the standard
    # error (0.2 / sqrt(40) ~ 0.03); 0.005 is ten times that.
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.005)
    assert ours[0] < values.mean() < ours[1]
    constant = metrics.bootstrap_interval([0.4, 0.4, 0.4], resamples=10, confidence=0.9, seed=0)
    assert constant == pytest.approx((0.4, 0.4), rel=gamma(3))  # a mean of three equal float64s


def test_random_subsets_are_seeded_half_sets_that_keep_earlier_models() -> None:
    four = random_subsets(4, 5, 10, seed=2)
    assert four.shape == (4, 10)
    assert (four.sum(axis=1) == 5).all()
    assert (random_subsets(6, 5, 10, seed=2)[:4] == four).all()
    assert not (random_subsets(4, 5, 10, seed=3) == four).all()
    assert len({m.tobytes() for m in four}) == 4


def test_query_losses_match_a_loop_over_timesteps_and_draws(tiny_run: TrainingRun) -> None:
    """The K-grid mean loss against the DDPM formula, one (timestep, draw) at a time."""
    last = tiny_run.checkpoints()[-1]
    model = DiffusionModel.from_parts(load_unet(last.path), load_scheduler(tiny_run.scheduler_folder))
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    query = QuerySpec(timesteps=3, draws=2, seed=4)
    generator = torch.Generator("cpu").manual_seed(4)
    noise = [torch.randn(1, 8, 8, generator=generator) for _ in range(6)]
    alphas = model.scheduler.alphas_cumprod.double()
    expected = []
    for image in images:
        total = 0.0
        for k, t in enumerate((1, 500, 999)):  # floor(linspace(1, 999, 3))
            for m in range(2):
                eps = noise[2 * k + m]
                x_t = (alphas[t].sqrt() * image + (1 - alphas[t]).sqrt() * eps).float()
                with torch.no_grad():
                    out = model.unet(x_t[None], torch.tensor([t])).sample[0]
                total += float(((out - eps) ** 2).double().mean())
        expected.append(total / 6)
    # float32 UNet outputs over the same inputs; the noising differs by float32 rounding of x_t.
    assert query_losses(model, "mse", images, query) == pytest.approx(expected, rel=1e-4)


def test_query_estimators_are_the_ones_the_spec_lists() -> None:
    field = QuerySpec.model_fields.get("estimator")
    found = query_estimators()
    if field is None:
        assert found == {DEFAULT_ESTIMATOR: {}}
    else:
        assert list(found) == [str(n) for n in typing.get_args(field.annotation)]
        for fields in found.values():
            QuerySpec(**fields)  # each one makes a valid spec


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[LdsConfig, LdsReport, object]:
    out = tmp_path_factory.mktemp("lds")
    config = LdsConfig.smoke()
    return config, run_lds(config, out, progress=False), out


def test_the_harness_reports_every_method_and_estimator(smoke) -> None:
    config, report, out = smoke
    assert json.loads((out / "lds.json").read_text()) == json.loads(report.model_dump_json())
    assert report.methods == [*ROWS, BASELINE]
    assert report.estimators == sorted([*query_estimators(), "baseline"])
    assert not report.skipped
    assert list(report.lds) == list(SPLITS)
    counts = {"validation": config.n_queries, "generated": config.n_generated}
    for split, by_method in report.lds.items():
        assert np.asarray(report.actual_losses[split]).shape == (config.models, counts[split])
        for method, by_estimator in by_method.items():
            for estimator, value in by_estimator.items():
                per_query = report.lds_per_query[split][method][estimator]
                assert len(per_query) == counts[split]
                assert all(-1 <= v <= 1 for v in per_query)
                assert value == pytest.approx(np.mean(per_query), abs=gamma(len(per_query)))
                low, high = report.lds_ci[split][method][estimator]
                slack = len(per_query) * np.finfo(np.float64).eps  # resampled means of float64 values
                assert min(per_query) - slack <= low <= high <= max(per_query) + slack
    removal = report.removal
    assert removal is not None
    assert len(removal.random) == config.removal_queries
    assert set(removal.top_k) == {*ROWS, BASELINE}
    assert report.self_retrieval is not None
    assert report.self_retrieval[BASELINE]["baseline"] == 1.0
    assert report.seed_variance is not None
    assert set(report.seed_variance) == set(SPLITS)
    # 2 checkpoints x (replay + 3 grid slots) x (k = 256 float16 values + one float32 norm)
    assert report.bytes_per_sample == 2 * 4 * (256 * 2 + 4)


def test_a_retrained_model_in_a_worker_gives_the_losses_computed_here(smoke) -> None:
    """Subset model 0, retrained in this process, reproduces the loss the worker process reported."""
    config, report, out = smoke
    training, queries = split_data(config)
    keep = tuple(
        np.flatnonzero(random_subsets(1, config.subset_size, config.n_train, config.seed)[0]).tolist()
    )
    dataset = DatasetSpec(source=str(out / "data" / "train.npz"), resolution=config.resolution)
    assert load_dataset(dataset).fingerprint == training.fingerprint
    job = RetrainJob(
        train_spec(config, dataset, save_every=config.epochs), training, keep, queries.images, config.measure
    )
    # One thread in both processes, the same machine: the same bytes, so the same losses.
    assert train_and_measure(job).tolist() == report.actual_losses["validation"][0]


def test_a_killed_run_resumes_with_what_it_had_finished(smoke, tmp_path) -> None:
    """What a kill leaves (entries are renamed into place only when complete): finished models and
    losses, leftover partial entries, a missing model. The rerun trains only the missing model, keeps
    every finished file as it was, and reports the same numbers as the uninterrupted run."""
    config, report, out = smoke
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    models = sorted(p for p in (resumed / "models").iterdir() if p.is_dir())
    shutil.rmtree(models[0])
    (resumed / "models" / ".partial-abc-1").mkdir()
    (resumed / "models" / ".partial-abc-2.npy").write_bytes(b"half")
    kept = {p: p.stat().st_mtime_ns for m in models[1:] for p in m.rglob("*") if p.is_file()}
    scores = {p: p.stat().st_mtime_ns for p in (resumed / "scores").iterdir()}
    again = run_lds(config.model_copy(update={"workers": 1}), resumed, progress=False)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert {p: p.stat().st_mtime_ns for p in scores} == scores  # no score matrix recomputed
    assert not list((resumed / "models").glob(".partial-*"))
    assert models[0].is_dir()
    assert again.actual_losses == report.actual_losses
    assert again.lds == report.lds


def test_pixel_cosine_against_a_loop() -> None:
    rng = np.random.default_rng(1)
    training, queries = (
        torch.from_numpy(rng.normal(size=(5, 1, 3, 3))),
        torch.from_numpy(rng.normal(size=(2, 1, 3, 3))),
    )
    found = pixel_cosine(training.float(), queries.float())
    for q in range(2):
        for n in range(5):
            a, b = queries[q].flatten().double(), training[n].flatten().double()
            # float32 inputs widened to float64: the cosine of the same float32 numbers, to float64 rounding
            a, b = a.float().double(), b.float().double()
            assert found[q, n] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=gamma(9))


def test_seed_variance_by_hand() -> None:
    first = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 3.0]])
    second = np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 3.0]])
    found = seed_variance(first, second)
    # Query 0: ranks (1,2,3) vs (1,3,2): Spearman 0.5; query 1: identical, 1.0.
    assert found.loss_spearman == pytest.approx(0.75, abs=1e-12)
    # Half mean squared difference: (0 + 1 + 1) / 3 / 2 = 1/3 and 0; variances across subsets: 1 and 1.
    assert found.noise_share == pytest.approx((1 / 3 + 0) / (1 + 1), abs=1e-12)
    assert found.models == 3


def test_the_quick_preset_indexes_the_slots_of_every_estimator() -> None:
    config = LdsConfig.quick()
    slots, query = config.slots, config.query
    assert slots.replay
    assert slots.noise == "shared"
    assert (slots.grid, slots.draws, slots.seed) == (query.timesteps, query.draws, query.seed)


def test_the_standard_preset_has_the_benchmark_sizes() -> None:
    config = LdsConfig.standard()
    training, validation = split_data(config.model_copy(update={"n_train": 20, "n_queries": 4}))
    assert config.n_train >= 1000
    assert config.resolution >= 16
    assert config.models >= 64
    assert config.n_queries >= 100
    assert config.n_generated >= 100
    assert config.seed_models == 8
    assert {i.split("-")[0] for i in training.ids + validation.ids} == {"digit", "patch"}
