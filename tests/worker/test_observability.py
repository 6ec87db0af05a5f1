"""What a real worker tells its operator: task events read into the exporter's metrics, JSON log lines
carrying the job and the request that started it, and a heartbeat its health check reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from retrac.replay import TrainingRun
from storage import GradientStore
from tests.storage.helpers import tiny_index_spec
from tests.worker.conftest import Workers, wait_until
from worker import control
from worker.app import app
from worker.metrics import WorkerMetrics, consume

pytestmark = pytest.mark.redis

JOB_SECONDS = 90


def health(heartbeat: Path) -> int:
    environment = {**os.environ, "RETRAC_HEARTBEAT_FILE": str(heartbeat)}
    command = [sys.executable, "-m", "worker.health", "--role", "worker"]
    return subprocess.run(command, env=environment, check=False, timeout=60).returncode


def test_a_job_shows_in_the_metrics_the_json_logs_and_the_heartbeat(
    tmp_path: Path, tiny_run: TrainingRun, workers: Workers, queue: str
) -> None:
    registry = CollectorRegistry()
    metrics, stop, listening = WorkerMetrics(registry), threading.Event(), threading.Event()
    listener = threading.Thread(target=consume, args=(app, metrics, stop, listening), daemon=True)
    listener.start()
    assert listening.wait(30), "the events receiver did not start listening"
    heartbeat = tmp_path / "heartbeat"
    assert health(heartbeat) == 1  # no worker has beaten yet
    try:
        path = tmp_path / "index.zarr"
        store = GradientStore.create(path, tiny_index_spec(tiny_run))
        shards, rows = store.num_checkpoints * store.num_shards, store.num_checkpoints * store.num_rows
        job = control.submit(path, queue=queue, request_id="req-42")
        workers.start("solo", RETRAC_LOG_FORMAT="json", RETRAC_HEARTBEAT_FILE=str(heartbeat))
        wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job")

        def counted(name: str, **labels: str) -> float:
            return sum(
                s.value
                for family in registry.collect()
                for s in family.samples
                if s.name == name and labels.items() <= s.labels.items()
            )

        wait_until(lambda: counted("retrac_worker_rows_total") == rows, 30, "every batch's rows event")
        succeeded = {"task": "retrac.index_shard", "state": "succeeded"}
        durations = "retrac_worker_task_duration_seconds_count"
        wait_until(lambda: counted(durations, **succeeded) == shards, 30, "task events")
        assert counted("retrac_worker_task_failures_total") == 0
        assert counted("retrac_workers_online") == 1
        assert health(heartbeat) == 0
    finally:
        stop.set()
        listener.join(10)

    log = (tmp_path / "solo.log").read_text().splitlines()
    lines = [json.loads(line) for line in log if line.startswith("{")]
    stored = [line for line in lines if "rows stored in" in line["message"]]
    assert len(stored) == shards
    assert all((s["request_id"], s["job"], s["index"]) == ("req-42", job, "index") for s in stored)
    assert len({s["task"] for s in stored}) == shards
