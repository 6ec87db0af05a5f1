"""Progress that moves per gradient batch: `index run` (embedded) and `attribute`, through the callbacks
of the engine, and the bars the CLI draws from them. Reporting never changes what is computed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from api_schemas import QuerySpec
from cli import main
from retrac.computers import GradientComputerCache
from storage import GradientStore, attribute, run_pending
from tests.storage.helpers import SHARD_SIZE, store_bytes, tiny_index_spec


def test_the_embedded_runner_reports_rows_after_every_gradient_batch(
    tmp_path: Path, tiny_run, reference_store: Path
) -> None:
    store = GradientStore.create(tmp_path / "index.zarr", tiny_index_spec(tiny_run))
    slots, batch = store.num_slots, store.spec.batch_size
    per_shard: list[list[int]] = [[]]
    run_pending(
        store,
        GradientComputerCache("cpu", threads=1),
        on_rows=lambda rows: per_shard[-1].append(rows),
        on_shard=lambda _c, _s, _n: per_shard.append([]),
    )
    per_shard.pop()  # opened after the last shard
    assert len(per_shard) == store.num_checkpoints * store.num_shards
    for counts in per_shard:
        # one report per gradient batch of `batch` (row, slot) pairs; together, every row of the shard once
        assert len(counts) == math.ceil(SHARD_SIZE * slots / batch) > 1
        assert sum(counts) == SHARD_SIZE
        assert all(c >= 1 for c in counts)
    assert store_bytes(store.path) == store_bytes(reference_store)


def test_a_query_reports_each_checkpoints_gradient_batches_and_the_scan(reference_store: Path) -> None:
    store = GradientStore.open(reference_store)
    images = store.plan.dataset.images[:2]
    query = QuerySpec(
        timesteps=6, draws=1
    )  # 2 images x 6 timesteps = 12 groups: two batches of 8 per checkpoint
    reports: list[tuple[str, int, int]] = []
    heard = attribute(store, images, query, top_k=3, on_progress=lambda *report: reports.append(report))
    gradients = [done for phase, done, total in reports if phase == "gradients"]
    scanned = [done for phase, done, total in reports if phase == "scan"]
    assert {total for phase, _, total in reports if phase == "gradients"} == {2 * store.num_checkpoints}
    assert {total for phase, _, total in reports if phase == "scan"} == {store.num_rows}
    assert gradients == [1, 1] * store.num_checkpoints  # an image is done when its 6 timesteps are
    assert sum(scanned) == store.num_rows
    assert [p for p, _, _ in reports] == ["gradients"] * len(gradients) + ["scan"] * len(scanned)
    silent = attribute(store, images, query, top_k=3)
    assert [r.model_dump() for r in heard.results] == [r.model_dump() for r in silent.results]


def test_the_cli_draws_bars_on_stderr_and_keeps_stdout_the_answer(
    tmp_path: Path, tiny_run, reference_store: Path, capsys
) -> None:
    path = tmp_path / "index.zarr"
    GradientStore.create(path, tiny_index_spec(tiny_run))
    assert main(["index", "run", str(path)]) == 0
    rows = 48 * 3  # samples x checkpoints
    assert f"{rows}/{rows}" in capsys.readouterr().err
    query = tmp_path / "q.npy"
    np.save(query, ((GradientStore.open(path).plan.dataset.images[0, 0] + 1) / 2).numpy())
    assert main(["attribute", str(path), str(query), "--timesteps", "2", "--draws", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out.lstrip().startswith("{")
    assert "gradients" in err
    assert f"{rows // 3}/{rows // 3}" in err


def test_a_running_shard_shows_its_rows_and_a_rate_from_its_first_batch(tmp_path: Path, tiny_run) -> None:
    from storage import progress
    from storage.progress import COMPUTING, STALE_S

    store = GradientStore.create(tmp_path / "index.zarr", tiny_index_spec(tiny_run))
    seen: list[tuple[int, object]] = []
    batches: list[int] = []

    def first_shard_batch(rows: int) -> None:
        batches.append(rows)
        if len(batches) == 1:  # the first batch of the first shard: nothing stored yet
            seen.append((rows, progress(store)))

    run_pending(store, GradientComputerCache("cpu", threads=1), on_rows=first_shard_batch)
    ((rows, running),) = seen
    assert (running.done_rows, running.done_shards, running.computing_rows) == (0, 0, rows)
    assert running.rate_per_s is not None
    assert running.rate_per_s > 0
    assert running.eta_s == (running.total_rows - rows) / running.rate_per_s
    done = progress(store)
    assert done.complete
    assert done.computing_rows == 0
    assert not store.location.sizes(COMPUTING)

    old = {"checkpoint": 0, "shard": 0, "rows": 3, "started_at": 1.0, "updated_at": 2.0}
    store.location.write(f"{COMPUTING}/c0-s0.json", json.dumps(old).encode())  # a done shard's leftover
    assert progress(store).computing_rows == 0
    fresh = GradientStore.create(tmp_path / "fresh.zarr", tiny_index_spec(tiny_run))
    now = time.time()
    for key, updated in (("c0-s0", now - STALE_S - 1), ("c0-s1", now)):  # a dead worker's record, a live one
        record = {**old, "shard": int(key[-1]), "started_at": updated - 4.0, "updated_at": updated}
        fresh.location.write(f"{COMPUTING}/{key}.json", json.dumps(record).encode())
    live = progress(fresh)
    assert (live.computing_rows, live.rate_per_s, live.last_active_at) == (3, 3 / 4.0, now)
