"""Stores in bfloat16: their rows are the float32 rows rounded, their scores the bf16 products of
those rows, within the rounding of bfloat16 products, and they say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from api_schemas import QuerySpec
from cli import main
from retrac.computers import GradientComputerCache
from retrac.query_side import query_vectors
from retrac.replay import TrainingRun
from storage import GradientStore, attribute, run_pending
from storage.store import ROW_ARRAYS
from tests.storage.helpers import tiny_index_spec
from tests.tolerances import BFLOAT16_ROUNDOFF, gamma

QUERY = QuerySpec(timesteps=6, draws=2, seed=4)
TOP_K = 5


@pytest.fixture(scope="module")
def stores(tiny_run: TrainingRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, GradientStore]:
    """The same index of `tiny_run` stored in float32 and in bfloat16."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("dtypes")
    models = GradientComputerCache("cpu", threads=1)
    out = {}
    for dtype in ("float32", "bfloat16"):
        store = GradientStore.create(folder / f"{dtype}.zarr", tiny_index_spec(tiny_run, dtype=dtype))
        run_pending(store, models)
        out[dtype] = store
    return out


def stored_rows(store: GradientStore, checkpoint: int) -> torch.Tensor:
    """The projected array `(N, S, k)` as a plain Zarr reader finds it."""
    return torch.from_numpy(zarr.open_group(store.path, mode="r")[f"checkpoints/{checkpoint}/projected"][:])


def test_bfloat16_rows_are_the_float32_rows_rounded_and_inspect_says_so(stores, capsys) -> None:
    for c in range(stores["float32"].num_checkpoints):
        bits = stored_rows(stores["bfloat16"], c)
        assert bits.dtype == torch.uint16  # Zarr has no bfloat16: its bits
        assert torch.equal(bits.view(torch.bfloat16), stored_rows(stores["float32"], c).to(torch.bfloat16))
    assert main(["index", "inspect", str(stores["bfloat16"].path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["dtype"] == "bfloat16"


def test_bfloat16_scores_are_the_rounded_rows_bf16_products(stores) -> None:
    """Against float64 products of the rounded rows and the rounded query vectors: each slot's product
    is rounded once to bfloat16 (relative `BFLOAT16_ROUNDOFF`) after a float32 sum of k terms."""
    store = stores["bfloat16"]
    images = store.plan.dataset.images[[3, 17]]
    models = GradientComputerCache("cpu", threads=1)
    answer = attribute(store, images, QUERY, top_k=TOP_K, models=models)
    assert answer.dtype == "bfloat16"
    checkpoints = range(store.num_checkpoints)
    vectors = [query_vectors(models.computer(store.plan, c), images, QUERY) for c in checkpoints]
    count, rows = len(images), store.num_rows
    for method in ("tracin", "retrac"):
        expected, bound = np.zeros((count, rows)), np.zeros((count, rows))
        for c, (query, weight) in enumerate(zip(vectors, store.weights, strict=True)):
            projected = stored_rows(store, c).view(torch.bfloat16).double()  # (N, S, k)
            side = getattr(query, method).to(torch.bfloat16).double()  # (Q, k)
            scale = torch.ones(projected.shape[:2], dtype=torch.float64)
            if method == "retrac":
                scale = 1 / torch.from_numpy(store.norms(c)).double()
            products = torch.einsum("nsd,qd->qns", projected, side) * scale
            magnitudes = torch.einsum("nsd,qd->qns", projected.abs(), side.abs()) * scale
            terms = BFLOAT16_ROUNDOFF * products.abs() + gamma(projected.shape[2]) * magnitudes
            expected += weight * products.mean(dim=2).numpy()
            bound += abs(weight) * terms.mean(dim=2).numpy()
        # The float32 means over slots and sums over checkpoints:
        bound += gamma(2 * projected.shape[1] * store.num_checkpoints) * np.abs(expected)
        row_of = {sample_id: row for row, sample_id in enumerate(store.sample_ids)}
        for q, result in enumerate(answer.results):
            for side, sign in (("proponents", 1), ("opponents", -1)):
                ranked = getattr(result.methods[method], side)
                chosen = [row_of[i.sample_id] for i in ranked]
                got = np.array([i.score for i in ranked])
                assert (np.abs(got - expected[q, chosen]) <= bound[q, chosen]).all(), (method, side, q)
                # A row is among the top k unless k rows beat it by more than both their bounds.
                kth = np.sort(sign * expected[q])[::-1][TOP_K - 1]
                assert (sign * expected[q, chosen] >= kth - 2 * bound[q].max()).all(), (method, side, q)


def test_bfloat16_and_float32_stores_rank_alike(stores) -> None:
    """The bf16 store's scores lie within a few bfloat16 roundings of the float32 store's (the error
    bench/scale.py measures at scale)."""
    models = GradientComputerCache("cpu", threads=1)
    images = stores["float32"].plan.dataset.images[[3, 17]]
    answers = {d: attribute(s, images, QUERY, top_k=48, models=models) for d, s in stores.items()}
    for got, want in zip(answers["bfloat16"].results, answers["float32"].results, strict=True):
        for method in ("tracin", "retrac"):
            mine = {i.sample_id: i.score for i in got.methods[method].proponents}
            theirs = {i.sample_id: i.score for i in want.methods[method].proponents}
            largest = max(abs(v) for v in theirs.values())
            error = max(abs(mine[k] - theirs[k]) for k in theirs) / largest
            assert 0 < error < 8 * BFLOAT16_ROUNDOFF, (method, error)  # rounded, and not more than that


def test_float16_rows_are_resident_as_float32_only_when_every_checkpoint_fits(reference_store: Path) -> None:
    """Widening is exact (the same numbers, scanned without a conversion per block), and costs twice the
    memory, so a budget that holds the float16 rows but not their float32 copies keeps them float16."""
    group = zarr.open_group(reference_store, mode="r")
    stored = [torch.from_numpy(group[f"checkpoints/{c}/projected"][:]) for c in range(3)]
    assert stored[0].dtype == torch.float16
    rows = np.arange(stored[0].shape[0])
    wide = GradientStore.open(reference_store)
    for c in range(3):
        read = wide.rows_at(c, rows).projected
        assert read.dtype == torch.float32
        assert torch.equal(read, stored[c].float())
    arrays = [group[f"checkpoints/{c}/{name}"] for c in range(3) for name in ROW_ARRAYS]
    float16_bytes = sum(a.nbytes for a in arrays)
    narrow = GradientStore.open(reference_store, resident_bytes=float16_bytes)
    for c in range(3):
        read = narrow.rows_at(c, rows).projected
        assert read.dtype == torch.float16
        assert torch.equal(read, stored[c])
    assert len(narrow._resident) == 3  # every checkpoint resident still, as float16
