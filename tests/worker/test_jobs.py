"""Indexing jobs on a real Redis with real worker processes: the store they build is the embedded one,
byte for byte, whatever happens to the workers or the broker on the way."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zarr
from celery.result import GroupResult

from api_schemas import KernelSpec
from retrac.replay import TrainingRun
from storage import GradientStore, delete_store, is_leftover, progress, run_pending
from storage.ann import load_ann
from storage.kernels import kernel_pending, load_kernel
from tests.storage.helpers import store_bytes, tiny_index_spec
from tests.worker.conftest import Workers, wait_until
from worker import control
from worker.app import app

pytestmark = pytest.mark.redis

JOB_SECONDS = 60
SHARDS = 18  # 3 checkpoints x 6 shards
RARE_REDELIVERIES = 2
"""Tasks of one job that may be handed out twice: more would mean workers routinely duplicate work."""


def results(job_id: str) -> list[dict]:
    return [task.result for task in GroupResult.restore(job_id, app=app).results]


def fresh_store(tmp_path: Path, run: TrainingRun) -> Path:
    path = tmp_path / "index.zarr"
    GradientStore.create(path, tiny_index_spec(run))
    return path


def assert_same_as_embedded(path: Path, reference: Path) -> None:
    store = GradientStore.open(path)
    assert store.status(verify=True).complete
    assert store_bytes(path) == store_bytes(reference)


def test_a_job_run_by_a_real_worker_equals_the_embedded_run(
    tmp_path: Path, tiny_run: TrainingRun, reference_store: Path, workers: Workers, queue: str
) -> None:
    path = fresh_store(tmp_path, tiny_run)
    job = control.submit(path, queue=queue)
    assert control.state(job) == "queued"
    assert progress(GradientStore.open(path)).done_rows == 0
    workers.start("solo")
    wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job")
    assert sorted((r["checkpoint"], r["shard"]) for r in results(job)) == [
        (c, s) for c in range(3) for s in range(6)
    ]
    assert {r["status"] for r in results(job)} == {"computed"}
    assert_same_as_embedded(path, reference_store)
    load_ann(GradientStore.open(path))  # the job's last task built a current ANN index
    done = control.progress(path)
    assert (done.done_rows, done.total_rows, done.eta_s) == (144, 144, 0.0)
    assert done.rate_per_s > 0


def test_a_worker_killed_mid_job_leaves_nothing_missing_or_different(
    tmp_path: Path, tiny_run: TrainingRun, reference_store: Path, workers: Workers, queue: str
) -> None:
    path = fresh_store(tmp_path, tiny_run)
    job = control.submit(path, queue=queue)
    # A short visibility timeout: the task the dead worker held is handed out again after 3 s.
    workers.start("doomed", RETRAC_VISIBILITY_TIMEOUT="3")
    wait_until(lambda: control.progress(path).done_shards >= 4, JOB_SECONDS, "4 shards")
    workers.kill("doomed")
    assert not control.progress(path).complete
    assert control.state(job) == "running"
    workers.start("rescuer", RETRAC_VISIBILITY_TIMEOUT="3")
    wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job to complete after the kill")
    assert_same_as_embedded(path, reference_store)


def test_two_workers_share_a_job_and_write_each_shard_once(
    tmp_path: Path, tiny_run: TrainingRun, reference_store: Path, workers: Workers, queue: str
) -> None:
    path = fresh_store(tmp_path, tiny_run)
    workers.start("left", wait=False)
    workers.start("right", wait=False)
    workers.wait_ready("left")
    workers.wait_ready("right")
    job = control.submit(path, queue=queue)
    wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job")
    outcomes = results(job)
    # Delivery is at least once: a task handed out again (a dropped broker connection gives back the
    # channel's unacknowledged task) finds its shard done and is "skipped"; the task's result is its
    # last run. Nothing else may happen to a shard, and none may be left out.
    assert {r["status"] for r in outcomes} <= {"computed", "skipped"}
    assert [r["status"] for r in outcomes].count("computed") >= SHARDS - RARE_REDELIVERIES, outcomes
    assert len({(r["checkpoint"], r["shard"]) for r in outcomes}) == SHARDS  # one task per shard
    assert len({r["worker"] for r in outcomes}) == 2  # both took part
    assert_same_as_embedded(path, reference_store)


@pytest.mark.parametrize("damage", ["missing", "stale"])
def test_a_job_builds_the_kernel_a_complete_checkpoint_lacks(
    tmp_path: Path, tiny_run: TrainingRun, workers: Workers, queue: str, damage: str
) -> None:
    """Every shard done but checkpoint 1's kernel gone (a build cut short) or stale (its rows' digest
    changed since): the job queues one task for it, which finds its shard done and builds the kernel,
    equal to the one the embedded run built over the same rows."""
    path = tmp_path / "index.zarr"
    GradientStore.create(path, tiny_index_spec(tiny_run, kernel=KernelSpec()))
    run_pending(GradientStore.open(path))
    built = load_kernel(GradientStore.open(path), 1).factor
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    if damage == "missing":
        del group["checkpoints/1/kernel"]
    else:
        group["checkpoints/1/kernel"].attrs["rows_digest"] = "1"
    store = GradientStore.open(path)
    assert [kernel_pending(store, c) for c in range(3)] == [False, True, False]
    job = control.submit(path, queue=queue)
    workers.start("solo")
    wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job")
    assert [(r["checkpoint"], r["status"]) for r in results(job)] == [(1, "skipped")]
    store = GradientStore.open(path)
    assert not any(kernel_pending(store, c) for c in range(3))
    torch.testing.assert_close(load_kernel(store, 1).factor, built, rtol=1e-12, atol=0)


class OwnRedis:
    """A redis-server of this test alone (no persistence), so it can be restarted freely."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 10, "redis-server to start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        reason = "needs the redis-server program to run a Redis of its own"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def retrac_index_run(path: Path, broker: str, queue: str, *flags: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "RETRAC_BROKER_URL": broker,
        "RETRAC_RESULT_BACKEND": broker,
        "RETRAC_QUEUE": queue,
    }
    return subprocess.run(
        [sys.executable, "-m", "cli", "index", "run", str(path), "--queue", *flags],
        env=environment,
        capture_output=True,
        text=True,
        timeout=JOB_SECONDS,
    )


def test_redis_restarted_mid_job_resumes_without_recomputing_done_shards(
    tmp_path: Path,
    tiny_run: TrainingRun,
    reference_store: Path,
    workers: Workers,
    queue: str,
    own_redis: OwnRedis,
) -> None:
    path = fresh_store(tmp_path, tiny_run)
    workers.start("steady", RETRAC_BROKER_URL=own_redis.url, RETRAC_RESULT_BACKEND=own_redis.url)
    submitted = retrac_index_run(path, own_redis.url, queue)
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: control.progress(path).done_shards >= 4, JOB_SECONDS, "4 shards")
    own_redis.stop()  # queue, job and results are gone with it: nothing was persisted
    store = GradientStore.open(path)
    before = {c: store.done_marks(c) for c in range(3)}
    assert not control.progress(path).complete
    own_redis.start()
    resumed = retrac_index_run(
        path, own_redis.url, queue, "--wait"
    )  # queues what is pending; the worker reconnects
    assert resumed.returncode == 0, resumed.stderr
    for c in range(3):
        after = store.done_marks(c)
        kept = before[c] > 0
        assert (after[kept] == before[c][kept]).all()  # done shards were not recomputed
    assert_same_as_embedded(path, reference_store)


def test_a_cancelled_job_runs_none_of_its_remaining_shards(
    tmp_path: Path, tiny_run: TrainingRun, workers: Workers, queue: str
) -> None:
    path = fresh_store(tmp_path, tiny_run)
    job = control.submit(path, queue=queue)
    control.cancel(job)
    workers.start("late")  # started after the cancel: it never saw the revoke broadcast
    tasks = GroupResult.restore(job, app=app).results
    wait_until(
        lambda: all(t.ready() for t in tasks), JOB_SECONDS, "the worker to go through the cancelled tasks"
    )
    # Skipped by the task itself (the cancel mark), or dropped by a worker that knew the revoke.
    assert all(t.state == "REVOKED" or t.result["status"] == "cancelled" for t in tasks)
    assert control.state(job) == "cancelled"
    assert progress(GradientStore.open(path)).done_shards == 0


def test_delete_while_a_worker_writes_leaves_nothing_and_the_name_reusable(
    tmp_path: Path, tiny_run: TrainingRun, reference_store: Path, workers: Workers, queue: str
) -> None:
    """A delete racing a real worker mid-job, its job left running (as when the store was submitted
    from the command line, unknown to the service): the worker drops every remaining shard."""
    path = fresh_store(tmp_path, tiny_run)
    job = control.submit(path, queue=queue)
    workers.start("busy")
    wait_until(lambda: control.progress(path).done_shards >= 2, JOB_SECONDS, "2 shards")
    done_before = control.progress(path).done_shards
    delete_store(path)
    # Gone at once: no whole store at the path (a shard already being written may leave its files
    # there, checked below), and nothing set aside is left.
    assert not (path / "zarr.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p != path] == ["busy.log"]
    tasks = GroupResult.restore(job, app=app).results
    wait_until(lambda: all(t.ready() for t in tasks), JOB_SECONDS, "the worker to go through the job")
    assert all(t.state == "SUCCESS" for t in tasks)  # no task failed on the vanished store
    statuses = [t.result["status"] for t in tasks]
    computed = statuses.count("computed")
    # Beyond the shards done before the delete: at most the one in flight at the mark, and one that
    # finished between reading the progress and the mark. Every other shard is dropped.
    assert done_before <= computed <= done_before + 2
    assert statuses.count("missing") == SHARDS - computed
    assert not path.exists() or is_leftover(path)  # at most a shard's files from a write already under way
    # The name is free again, and the same worker fills the new store at that path.
    shutil.rmtree(path, ignore_errors=True)
    path = fresh_store(tmp_path, tiny_run)
    again = control.submit(path, queue=queue)
    wait_until(lambda: control.state(again) == "done", JOB_SECONDS, "the job on the recreated store")
    assert_same_as_embedded(path, reference_store)


STALL_SECONDS = 1.0
"""A short stall limit for the test (the default is `WorkerSettings.stall_seconds`)."""


def test_a_job_without_workers_is_reported_stalled_and_a_failed_one_says_why(
    tmp_path: Path, tiny_run: TrainingRun, workers: Workers, queue: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run.folder, run)
    path = tmp_path / "index.zarr"
    GradientStore.create(path, tiny_index_spec(run))
    job = control.submit(path, queue=queue)
    assert control.stalled(job, path, seconds=STALL_SECONDS) is None  # just submitted
    wait_until(
        lambda: control.stalled(job, path, seconds=STALL_SECONDS) is not None, 10, "the job to stall"
    )
    assert "no worker answered" in control.stalled(job, path, seconds=STALL_SECONDS)
    config = run / "checkpoints" / "epoch-0004" / "config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "norm_eps": 1e-6})
    )  # the store is stale: every shard fails
    workers.start("picky")
    wait_until(lambda: control.state(job) == "failed", JOB_SECONDS, "the job to fail")
    reason = control.failure(job)
    assert reason is not None
    assert "StaleStoreError" in reason
    assert "stale" in reason
