"""A store's TRAK kernels: built by `retrac index run` over the stored rows, equal to the engine's
in-memory ones, refused when a shard changed or the kernel's bytes are damaged, rebuilt by the next run;
trak through the exact scan, the ANN index and the CLI, and a method the store lacks refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from api_schemas import QuerySpec
from cli import main
from retrac.attribution import Attributor
from storage import GradientStore, attribute, run_pending
from storage.errors import DamagedStoreError, StaleStoreError
from storage.kernels import kernel_pending, load_kernel

KERNEL_ERROR = 1e-12
"""Relative: the store's and the engine's kernels, float64 sums of the same float32 rows in other orders."""


@pytest.fixture
def kernel_store(tiny_run, tmp_path) -> str:
    path = str(tmp_path / "index.zarr")
    assert main(["index", "create", path, "--run", str(tiny_run.folder), "--dim", "64", "--shard-size", "16",
                 "--dtype", "float32", "--kernel", "--kernel-ridge", "0.2"]) == 0
    assert main(["index", "run", path]) == 0
    return path


def test_stored_kernels_equal_the_engines_and_serve_trak(kernel_store, tmp_path, capsys) -> None:
    store = GradientStore.open(kernel_store)
    attributor = Attributor(store.plan)
    attributor.index()
    assert attributor.kernels is not None
    for c, expected in enumerate(attributor.kernels):
        stored = load_kernel(store, c)
        assert stored.ridge == pytest.approx(expected.ridge, rel=KERNEL_ERROR)
        error = (stored.matrix() - expected.matrix()).abs().max() / expected.matrix().abs().max()
        assert float(error) < KERNEL_ERROR
    images, query = store.plan.dataset.images[3:5], QuerySpec(timesteps=3, draws=1)
    want = attributor.attribute(images, query, top_k=5, methods=["trak"])
    for search in ("exact", "approximate"):
        got = attribute(store, images, query.model_copy(update={"search": search}), top_k=5, methods=["trak"])
        for mine, theirs in zip(got.results, want, strict=True):
            ids = [i.sample_id for i in mine.methods["trak"].proponents]
            assert ids == [i.sample_id for i in theirs.methods["trak"].proponents], search
    picture = tmp_path / "query.npy"
    np.save(picture, ((images[0, 0] + 1) / 2).numpy())
    capsys.readouterr()
    assert main(["attribute", kernel_store, str(picture), "--top-k", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)  # the defaults: the measured best the store serves
    assert (answer["estimator"], list(answer["data"][0]["methods"])) == ("matched", ["trak"])


def test_a_changed_shard_makes_the_kernel_stale_until_the_next_run(kernel_store) -> None:
    store = GradientStore.open(kernel_store)
    rows = store.plan.compute_rows(1, store.shard_rows(0), Attributor(store.plan).computer(1))
    changed = type(rows)(rows.projected * 2, rows.norms * 2, rows.timesteps, rows.seeds)
    store.write_shard(1, 0, changed)
    with pytest.raises(StaleStoreError, match="retrac index run"):
        load_kernel(GradientStore.open(kernel_store), 1)
    assert kernel_pending(store, 1)
    assert not kernel_pending(store, 0)
    run_pending(store)
    assert not kernel_pending(store, 1)
    load_kernel(GradientStore.open(kernel_store), 1)


def test_a_damaged_kernel_is_refused_and_rebuilt(kernel_store) -> None:
    folder = GradientStore.open(kernel_store).path / "checkpoints" / "0" / "kernel"
    chunk = next(p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedStoreError, match="retrac index run"):
        load_kernel(GradientStore.open(kernel_store), 0)
    run_pending(GradientStore.open(kernel_store))
    kernel = load_kernel(GradientStore.open(kernel_store), 0)
    assert bool(torch.isfinite(kernel.factor).all())


@pytest.mark.parametrize(
    ("method", "flag"), [("dtrak", "--output-function output-norm"), ("trak", "--kernel")]
)
def test_a_method_the_store_cannot_serve_exits_2_naming_the_flag(
    reference_store, tmp_path, capsys, method: str, flag: str
) -> None:
    query = tmp_path / "query.npy"
    np.save(query, np.zeros((8, 8), dtype=np.float32))
    capsys.readouterr()
    assert main(["attribute", str(reference_store), str(query), "--method", method]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("retrac: error:")
    assert flag in error
    assert "\n" not in error
