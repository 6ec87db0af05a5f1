"""Reading the store back: streamed top-k against dense brute force, the in-memory engine, self-influence."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from api_schemas import QuerySpec
from retrac.attribution import Attributor
from retrac.computers import GradientComputerCache
from retrac.evaluation.outliers import OUTLIER_SCORES
from retrac.evaluation.outliers import outlier_scores as in_memory_outlier_scores
from retrac.exceptions import SpecError
from retrac.query_side import query_vectors
from retrac.replay import TrainingRun
from retrac.scoring import RowChunk, scan
from storage import (
    GradientStore,
    IncompleteStoreError,
    attribute,
    outlier_scores,
    run_pending,
    self_influence,
    stored_norms,
)
from tests.storage.helpers import SHARD_SIZE, tiny_index_spec

QUERY = QuerySpec(timesteps=6, draws=2, seed=4)
TOP_K = 5
SCORE_TOLERANCE = 1e-5
"""Of the largest score: float32 sums in another order (chunked matmuls vs a float64 loop)."""


def assert_scores_close(actual: object, expected: np.ndarray, scale: np.ndarray) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=SCORE_TOLERANCE * np.abs(scale).max()
    )


def dense_scores(path: Path, vectors: list, weights: list[float]) -> dict[str, np.ndarray]:
    """TracIn and ReTrac `(Q, N)` by a float64 loop over every checkpoint, sample and slot."""
    group = zarr.open_group(path, mode="r")
    count, rows = vectors[0].tracin.shape[0], group["sample_ids"].shape[0]
    scores = {"tracin": np.zeros((count, rows)), "retrac": np.zeros((count, rows))}
    for c, (query, weight) in enumerate(zip(vectors, weights, strict=True)):
        projected = group[f"checkpoints/{c}/projected"][:].astype(np.float64)
        norms = group[f"checkpoints/{c}/norms"][:].astype(np.float64)
        for q in range(count):
            for n in range(rows):
                slots = projected.shape[1]
                tracin = sum(projected[n, s] @ query.tracin[q].double().numpy() for s in range(slots)) / slots
                retrac = (
                    sum(
                        projected[n, s] @ query.retrac[q].double().numpy() / norms[n, s] for s in range(slots)
                    )
                    / slots
                )
                scores["tracin"][q, n] += weight * tracin
                scores["retrac"][q, n] += weight * retrac
    return scores


@pytest.fixture(scope="module")
def query_images(reference_store: Path) -> torch.Tensor:
    images = GradientStore.open(reference_store).plan.dataset.images
    return torch.cat([images[[3, 17]], torch.rand(1, *images.shape[1:]) * 2 - 1])


def test_streaming_top_k_equals_dense_computation(reference_store: Path, query_images: torch.Tensor) -> None:
    streamed = GradientStore.open(reference_store, resident_bytes=0)  # nothing resident: read chunk by chunk
    models = GradientComputerCache("cpu")
    vectors = [query_vectors(models.computer(streamed.plan, c), query_images, QUERY) for c in range(3)]
    dense = dense_scores(reference_store, vectors, streamed.weights)

    sizes = []

    def recorded(chunks):
        for first, rows in chunks:
            sizes.append(rows[0].projected.shape[0])
            yield first, rows

    ranking = scan(
        recorded(streamed.chunks([0, 1, 2], rows_per_chunk=SHARD_SIZE)),
        vectors,
        streamed.weights,
        top_k=TOP_K,
    )
    assert sizes == [SHARD_SIZE] * 6  # memory bounded by the chunk, whatever N
    for method in ("tracin", "retrac"):
        order = np.argsort(-dense[method], axis=1, kind="stable")
        for q in range(3):
            top, bottom = order[q, :TOP_K], order[q, ::-1][:TOP_K]
            assert ranking.proponents[method].rows[q].tolist() == top.tolist()
            assert ranking.opponents[method].rows[q].tolist() == bottom.tolist()
            assert_scores_close(ranking.proponents[method].scores[q], dense[method][q, top], dense[method])
            assert_scores_close(ranking.opponents[method].scores[q], dense[method][q, bottom], dense[method])

    # The resident path and the named results give the same answer.
    answer = attribute(GradientStore.open(reference_store), query_images, QUERY, top_k=TOP_K, models=models)
    ids = streamed.sample_ids
    for q, result in enumerate(answer.results):
        for method in ("tracin", "retrac"):
            top = np.argsort(-dense[method][q], kind="stable")[:TOP_K]
            assert [i.sample_id for i in result.methods[method].proponents] == [ids[r] for r in top]
            contributions = np.array([i.contributions for i in result.methods[method].proponents])
            assert_scores_close(contributions.sum(axis=1), dense[method][q, top], dense[method])
    assert answer.timings.gradient_s > 0
    assert answer.timings.scan_s > 0


def test_attribute_matches_the_in_memory_engine(
    tmp_path: Path, tiny_run: TrainingRun, query_images: torch.Tensor
) -> None:
    store = GradientStore.create(tmp_path / "index.zarr", tiny_index_spec(tiny_run, dtype="float32"))
    run_pending(store, GradientComputerCache("cpu"))
    engine = Attributor(store.plan)
    engine.index(shard_size=SHARD_SIZE)
    expected = engine.attribute(query_images, QUERY, top_k=TOP_K, checkpoints=[0, 2])
    got = attribute(store, query_images, QUERY, top_k=TOP_K, checkpoints=[0, 2]).results
    for mine, theirs in zip(got, expected, strict=True):
        for side in ("proponents", "opponents"):
            for method in ("tracin", "retrac"):
                a, b = getattr(mine.methods[method], side), getattr(theirs.methods[method], side)
                assert [i.sample_id for i in a] == [i.sample_id for i in b]
                assert [i.timesteps for i in a] == [i.timesteps for i in b]
                assert_scores_close(
                    [i.score for i in a], np.array([i.score for i in b]), np.array([i.score for i in b])
                )


def test_attribute_refuses_images_of_another_shape(reference_store: Path) -> None:
    store = GradientStore.open(reference_store)
    with pytest.raises(SpecError, match=r"query images must be \(Q, 1, 8, 8\)"):
        attribute(store, torch.zeros(1, 1, 16, 16), QUERY)


def test_attribute_refuses_a_missing_checkpoint_and_an_unfinished_store(
    tmp_path: Path, tiny_run: TrainingRun, query_images: torch.Tensor
) -> None:
    store = GradientStore.create(tmp_path / "index.zarr", tiny_index_spec(tiny_run))
    with pytest.raises(SpecError, match=r"checkpoints \[3\] do not exist"):
        attribute(store, query_images, QUERY, checkpoints=[0, 3])
    with pytest.raises(IncompleteStoreError, match="0/48 rows"):
        attribute(store, query_images, QUERY)


def test_attribute_reads_the_timesteps_of_the_ranked_rows_only(
    reference_store: Path, query_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = GradientStore.open(reference_store)
    stored = store.timesteps(2)

    def whole_array(*_: object) -> None:
        raise AssertionError("attribute read the whole (N, S) timesteps array")

    monkeypatch.setattr(store, "timesteps", whole_array)
    answer = attribute(store, query_images, QUERY, top_k=TOP_K)
    row_of = {sample_id: row for row, sample_id in enumerate(store.sample_ids)}
    for result in answer.results:
        for ranking in result.methods.values():
            for influence in ranking.proponents + ranking.opponents:
                assert influence.timesteps == stored[row_of[influence.sample_id]].tolist()


def test_self_influence_from_stored_slots(reference_store: Path) -> None:
    store = GradientStore.open(reference_store)
    got = self_influence(store)
    group = zarr.open_group(reference_store, mode="r")
    expected = {"tracin": np.zeros(48), "retrac": np.zeros(48)}
    for c, weight in enumerate(store.weights):
        projected = group[f"checkpoints/{c}/projected"][:].astype(np.float64)
        norms = group[f"checkpoints/{c}/norms"][:].astype(np.float64)
        for n in range(48):
            train, grid = projected[n, 0], projected[n, 1:3]  # slot 0 replays training; 1, 2 are the grid
            expected["tracin"][n] += weight * train @ grid.mean(axis=0)
            unit = grid / norms[n, 1:3, None]
            expected["retrac"][n] += weight * (train / norms[n, 0]) @ unit.mean(axis=0)
    for method in ("tracin", "retrac"):
        assert_scores_close(got[method], expected[method], expected[method])


def test_outlier_scores_read_chunk_by_chunk_equal_the_in_memory_ones(
    reference_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's scores, read 7 rows at a time (the atypical direction's mean unit vectors spanning
    chunks), against `retrac.evaluation.outliers` over every row at once (itself checked against a
    loop in tests/evaluation/test_outliers.py)."""
    monkeypatch.setattr("storage.queries.SCAN_ROWS", 7)
    store = GradientStore.open(reference_store)
    got = outlier_scores(store)
    group = zarr.open_group(reference_store, mode="r")
    rows = [
        RowChunk(
            torch.from_numpy(group[f"checkpoints/{c}/projected"][:].astype(np.float32)),
            torch.from_numpy(group[f"checkpoints/{c}/norms"][:]),
        )
        for c in range(store.num_checkpoints)
    ]
    expected = in_memory_outlier_scores(rows, store.weights, store.slot_kinds)
    assert list(got) == list(OUTLIER_SCORES)
    for name in OUTLIER_SCORES:
        assert_scores_close(got[name], expected[name], expected[name])


def test_self_influence_needs_grid_slots(tmp_path: Path, tiny_run: TrainingRun) -> None:
    store = GradientStore.create(tmp_path / "index.zarr", tiny_index_spec(tiny_run, slots={"replay": True}))
    with pytest.raises(SpecError, match="needs grid slots"):
        self_influence(store)


def test_norm_timestep_pairs(reference_store: Path, tiny_run: TrainingRun) -> None:
    pairs = stored_norms(GradientStore.open(reference_store), 2)
    assert pairs.slot_kinds == ("replay", "grid", "grid")
    assert pairs.timesteps.shape == pairs.norms.shape == (48, 3)
    assert np.array_equal(pairs.timesteps[:, 0], tiny_run.timesteps[5].numpy())  # epoch 6's replayed steps
    assert (pairs.timesteps[:, 1:] == [1, 999]).all()  # floor(linspace(1, T-1, 2))
    assert (pairs.norms > 0).all()


def test_the_gradient_lock_is_held_for_the_gradients_alone(
    reference_store: Path, query_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving process serialises query gradients (its shared models are not thread-safe), never scans."""
    store = GradientStore.open(reference_store)
    lock = threading.Lock()
    models = GradientComputerCache("cpu")
    held_while: dict[str, list[bool]] = {"gradients": [], "scan": []}
    computer = models.computer

    def recorded_computer(*args: object):
        held_while["gradients"].append(lock.locked())
        return computer(*args)

    def recorded_chunks(checkpoints, rows_per_chunk):
        for item in GradientStore.chunks(store, checkpoints, rows_per_chunk):
            held_while["scan"].append(lock.locked())
            yield item

    monkeypatch.setattr(models, "computer", recorded_computer)
    monkeypatch.setattr(store, "chunks", recorded_chunks)
    attribute(store, query_images, QUERY, top_k=TOP_K, models=models, gradient_lock=lock)
    assert held_while["gradients"] == [True] * 3
    assert held_while["scan"]
    assert not any(held_while["scan"])
