"""Approximate search (`storage.ann`): the ANN index's answers against the exact scan, and every way an
ANN index can be missing, stale or damaged refused with what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from api_schemas import QuerySpec
from cli import main
from retrac.attribution import Attributor
from retrac.computers import GradientComputerCache
from retrac.exceptions import SpecError
from retrac.plan import Rows
from retrac.query_side import QueryVectors
from retrac.replay import TrainingRun
from retrac.scoring import RowChunk, scan
from storage import AnnIndexError, GradientStore, attribute, build_ann, run_pending
from storage import ann as ann_module
from storage.ann import AnnIndex, AnnParams, build_indexes, load_ann, query_matrix
from tests.storage.helpers import tiny_index_spec
from tests.storage.test_scan import assert_scores_close

QUERY = QuerySpec(timesteps=6, draws=2, seed=4)
APPROXIMATE = QUERY.model_copy(update={"search": "approximate"})
TOP_K = 3


@pytest.fixture(scope="module")
def store_path(tiny_run: TrainingRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete store of `tiny_run` (48 rows, 3 checkpoints), its ANN index built by the runner."""
    path = tmp_path_factory.mktemp("ann") / "index.zarr"
    run_pending(
        GradientStore.create(path, tiny_index_spec(tiny_run)), GradientComputerCache("cpu", threads=1)
    )
    return path


@pytest.fixture
def own_store(store_path: Path, tmp_path: Path) -> GradientStore:
    """A copy of `store_path` this test may change."""
    shutil.copytree(store_path, tmp_path / "index.zarr")
    return GradientStore.open(tmp_path / "index.zarr")


@pytest.fixture(scope="module")
def images(store_path: Path) -> torch.Tensor:
    return GradientStore.open(store_path).plan.dataset.images[[3, 17, 40]]


def test_the_runner_builds_the_ann_index_after_the_last_shard(store_path: Path) -> None:
    assert sorted(p.name for p in (store_path / "ann").iterdir()) == [
        "manifest.json",
        "retrac.faiss",
        "tracin.faiss",
    ]


@pytest.mark.parametrize("checkpoints", [None, [0, 2]])
def test_approximate_top_k_equals_exact_on_an_easy_case(
    own_store: GradientStore,
    images: torch.Tensor,
    checkpoints: list[int] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Easy: every list probed, so only the 4-bit codes approximate; 4 candidates per row asked, not all 48.
    build_ann(own_store, AnnParams(nlist=4, nprobe=4))
    monkeypatch.setattr(ann_module, "MIN_CANDIDATES", 1)
    monkeypatch.setattr(ann_module, "CANDIDATE_SHARE", 1.0)
    monkeypatch.setattr(ann_module, "CANDIDATES_PER_K", 4)  # 12 candidates for the top 3
    read: list[int] = []
    original = own_store.rows_at

    def counted(checkpoint: int, rows: np.ndarray):
        read.append(len(rows))
        return original(checkpoint, rows)

    monkeypatch.setattr(own_store, "rows_at", counted)
    models = GradientComputerCache("cpu")
    exact = attribute(own_store, images, QUERY, top_k=TOP_K, checkpoints=checkpoints, models=models)
    approximate = attribute(
        own_store, images, APPROXIMATE, top_k=TOP_K, checkpoints=checkpoints, models=models
    )
    assert (exact.search, approximate.search) == ("exact", "approximate")
    assert read
    assert max(read) < own_store.num_rows  # rescored candidates only, not a scan
    for got, want in zip(approximate.results, exact.results, strict=True):
        for method in ("tracin", "retrac"):
            for side in ("proponents", "opponents"):
                ours, theirs = getattr(got.methods[method], side), getattr(want.methods[method], side)
                assert [i.sample_id for i in ours] == [i.sample_id for i in theirs], (method, side)
                assert [i.timesteps for i in ours] == [i.timesteps for i in theirs]
                scale = np.array([i.score for i in theirs])
                assert_scores_close([i.score for i in ours], scale, scale)
                assert_scores_close(
                    np.array([i.contributions for i in ours]),
                    np.array([i.contributions for i in theirs]),
                    scale,
                )


def test_a_store_without_an_ann_index_is_refused_with_how_to_build_it(
    own_store: GradientStore, images: torch.Tensor
) -> None:
    shutil.rmtree(own_store.path / "ann")
    with pytest.raises(AnnIndexError, match=r"has no ANN index.*retrac index ann index.zarr"):
        attribute(own_store, images, APPROXIMATE, top_k=TOP_K)
    build_ann(own_store)
    assert attribute(own_store, images, APPROXIMATE, top_k=TOP_K).search == "approximate"


def test_an_ann_index_of_other_rows_is_refused_as_stale(
    own_store: GradientStore, images: torch.Tensor
) -> None:
    shard = own_store.shard_rows(1)
    stored = own_store.rows_at(0, np.arange(shard.start, shard.stop))
    timesteps = torch.from_numpy(own_store.timesteps(0)[shard])
    own_store.write_shard(
        0, 1, Rows(stored.projected.float() * 2, stored.norms * 2, timesteps, timesteps)
    )  # other bytes
    with pytest.raises(AnnIndexError, match=r"built from other rows.*\(stale\).*retrac index ann"):
        attribute(own_store, images, APPROXIMATE, top_k=TOP_K)
    assert attribute(own_store, images, QUERY, top_k=TOP_K).search == "exact"  # the exact scan still answers


def test_an_ann_index_of_an_older_format_is_refused_as_such(
    own_store: GradientStore, images: torch.Tensor
) -> None:
    manifest = own_store.path / "ann" / "manifest.json"
    old = json.loads(manifest.read_text()) | {"format": "retrac-ann/1"}
    manifest.write_text(json.dumps(old))
    with pytest.raises(
        AnnIndexError, match=r"format 'retrac-ann/1', which this version does not read.*retrac index ann"
    ):
        attribute(GradientStore.open(own_store.path), images, APPROXIMATE, top_k=TOP_K)


def test_a_damaged_ann_index_is_refused(own_store: GradientStore, images: torch.Tensor) -> None:
    file = own_store.path / "ann" / "retrac.faiss"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(AnnIndexError, match=r"retrac.faiss does not match its digest \(damaged\)"):
        attribute(GradientStore.open(own_store.path), images, APPROXIMATE, top_k=TOP_K)


def test_in_memory_rows_have_no_ann_index(store_path: Path, images: torch.Tensor) -> None:
    engine = Attributor(GradientStore.open(store_path).plan)
    with pytest.raises(SpecError, match="approximate search needs a store's ANN index"):
        engine.attribute(images, APPROXIMATE, top_k=TOP_K)


def test_a_rebuilt_ann_index_is_read_again(own_store: GradientStore) -> None:
    assert load_ann(own_store).params == AnnParams.for_rows(own_store.num_rows)
    build_ann(own_store, AnnParams(nlist=4, nprobe=2))
    assert load_ann(own_store).params == AnnParams(nlist=4, nprobe=2)
    assert load_ann(own_store).indexes["tracin"].nlist == 4


def test_the_cli_refuses_approximate_search_without_an_ann_index_then_builds_one(
    own_store: GradientStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "query.npy"
    np.save(image, ((own_store.plan.dataset.images[5, 0] + 1) / 2).numpy())
    shutil.rmtree(own_store.path / "ann")
    flags = [str(own_store.path), str(image), "--timesteps", "3", "--draws", "1", "--search", "approximate"]
    assert main(["attribute", *flags]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "has no ANN index" in error
    assert "`retrac index ann index.zarr`" in error
    assert main(["index", "ann", str(own_store.path), "--lists", "2", "--probe", "1"]) == 0
    assert "ANN index built (2 lists, 1 probed)" in capsys.readouterr().out
    assert main(["attribute", *flags, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["search"] == "approximate"
    assert main(["index", "ann", str(own_store.path), "--lists", "49"]) == 2
    assert "--lists must be 1..48" in capsys.readouterr().err


def test_candidate_rows_read_from_zarr_equal_the_resident_ones(store_path: Path) -> None:
    rows = np.array([0, 5, 7, 8, 30, 47])  # across shards 0, 1, 3 and 5 of 8 rows each
    streamed = GradientStore.open(store_path, resident_bytes=0).rows_at(1, rows)
    resident = GradientStore.open(store_path).rows_at(1, rows)
    full = GradientStore.open(store_path).chunks([1], rows_per_chunk=48)
    whole = next(iter(full))[1][0]
    for got in (streamed, resident):
        assert torch.equal(got.projected, whole.projected[rows])
        assert torch.equal(got.norms, whole.norms[rows])


def test_approximate_search_with_the_matched_estimator_is_refused(
    store_path: Path, images: torch.Tensor
) -> None:
    query = APPROXIMATE.model_copy(update={"estimator": "matched"})
    with pytest.raises(SpecError, match="approximate search serves the paper estimator"):
        attribute(
            GradientStore.open(store_path), images, query, top_k=TOP_K, models=GradientComputerCache("cpu")
        )


def clustered_rows(generator: torch.Generator, rows: int, clusters: int, slots: int, dim: int) -> RowChunk:
    """Rows near `clusters` random directions, at norms spread over two orders of magnitude (as the
    timestep spreads a gradient's norm): the structure an IVF index's lists can follow."""
    centers = torch.randn(clusters, dim, generator=generator)
    picked = centers[torch.randint(clusters, (rows, slots), generator=generator)]
    projected = picked + 0.5 * torch.randn(rows, slots, dim, generator=generator)
    projected *= torch.exp(2 * torch.rand(rows, slots, 1, generator=generator) - 1) ** 2.3
    return RowChunk(projected.half(), projected.half().float().norm(dim=-1))


def test_rescored_candidates_of_a_clustered_store_are_its_brute_force_extremes() -> None:
    # 8,000 rows, 2 slots, 2 checkpoints of k = 31 (62 coordinates, one per 4-bit code), 16 lists all
    # probed: the codes only rank, 128 candidates rescored per query and side. Brute force in float64.
    generator = torch.Generator().manual_seed(5)
    weights, rows, top_k = [0.7, 1.3], 8000, 10
    stored = [clustered_rows(generator, rows, 12, 2, 31) for _ in weights]
    queries = [
        QueryVectors(torch.randn(4, 3, 31, generator=generator), torch.rand(4, 3, generator=generator) + 0.5,
                     torch.zeros(3, dtype=torch.int64))
        for _ in weights
    ]
    params = AnnParams(nlist=16, nprobe=16)
    index = AnnIndex(build_indexes(lambda: iter([(0, stored)]), rows, weights, params), params)
    matrices = {m: query_matrix(queries, [0, 1], 2, m) for m in ("tracin", "retrac")}
    candidates = index.candidates(matrices, 128, top_k)
    assert len(candidates) < rows / 3  # 4 queries x 2 sides x 2 methods x 128 at most
    chunk = [RowChunk(c.projected[candidates], c.norms[candidates]) for c in stored]
    ranking = scan([(0, chunk)], queries, weights, top_k=top_k)
    for method, matrix in matrices.items():
        gradients = [c.projected.double() / (c.norms.double().unsqueeze(-1) if method == "retrac" else 1.0)
                     for c in stored]  # g or g / ||g|| (n, S, k)
        vectors = np.concatenate([w * g.mean(1).numpy() for w, g in zip(weights, gradients, strict=True)], 1)
        scores = matrix.astype(np.float64) @ vectors.T  # (Q, rows)
        for side, order in (("proponents", -1), ("opponents", 1)):
            got = getattr(ranking, side)[method]
            want = np.argsort(order * scores, axis=1)[:, :top_k]
            assert np.array_equal(candidates[got.rows.numpy()], want), (method, side)  # recall 1.0, in order
            assert_scores_close(got.scores, np.take_along_axis(scores, want, 1), scores)


@pytest.mark.parametrize(
    ("rows", "top_k", "count"),
    [(48, 3, 48), (4096, 10, 256), (250_000, 10, 1280), (250_000, 1, 256), (250_000, 1000, 15_625),
     (100, 200, 100)],
)
def test_candidates_are_128_per_row_asked_within_a_share_of_rows(rows: int, top_k: int, count: int) -> None:
    assert ann_module.candidate_count(rows, top_k) == count


def test_vectors_are_padded_with_zeros_to_whole_codes() -> None:
    vectors = np.random.default_rng(2).standard_normal((5, 515))  # 515 coordinates: codes of 2
    padded = ann_module.coded(vectors)
    assert padded.shape == (5, 516)
    assert padded.dtype == np.float32
    assert padded.flags.c_contiguous
    assert np.array_equal(padded[:, :515], vectors.astype(np.float32))
    assert not padded[:, 515].any()


def test_a_store_of_fewer_rows_than_a_codebook_has_centroids_is_indexed_and_searched() -> None:
    generator = torch.Generator().manual_seed(1)
    stored = [clustered_rows(generator, 5, 2, 1, 40)]  # 5 rows: fewer than a 4-bit codebook's 16
    one_timestep = torch.zeros(1, dtype=torch.int64)
    queries = [QueryVectors(torch.randn(2, 1, 40, generator=generator), torch.ones(2, 1), one_timestep)]
    params = AnnParams(nlist=1, nprobe=1)
    index = AnnIndex(build_indexes(lambda: iter([(0, stored)]), 5, [1.0], params, methods=["tracin"]), params)
    assert index.indexes["tracin"].ntotal == 5
    found = index.candidates({"tracin": query_matrix(queries, [0], 1, "tracin")}, 5, 5)
    assert np.array_equal(found, np.arange(5))
