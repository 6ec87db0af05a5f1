"""Fixtures and rules shared by every test package.

- `tiny_run`: a micro DDPM trained in about a second, with replay record and three checkpoints.
- `reference_store`: an index of `tiny_run` filled by the embedded runner, to compare stores with.
- `s3_server` and `bucket` (tests/storage/object_store.py): moto's S3 server on loopback, a bucket.
- `redis_url`, and the `redis` marker: tests that need the real Redis at 127.0.0.1:6379 skip with a
  reason when it is unreachable, and fail instead under `CI=true` (where it must be running).
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path

import pytest
import torch

from api_schemas import DatasetSpec, TrainSpec
from retrac.datasets import load_dataset
from retrac.replay import TrainingRun
from retrac.training import train
from tests.storage.object_store import bucket, s3_server  # noqa: F401 (fixtures: an S3 server, a bucket)

torch.set_num_threads(1)  # two processes contending with torch's default threads run ~100x slower

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

TINY_DATASET = DatasetSpec(source="builtin:digits", resolution=8, limit=48)
TINY_TRAIN = TrainSpec(
    dataset=TINY_DATASET, preset="micro", epochs=6, batch_size=16, lr=2e-3, save_every=2, seed=0
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TrainingRun:
    """`TINY_TRAIN`: 48 digits at 8 px, 6 epochs, batch 16, mse; checkpoints after epochs 2, 4 and 6.

    Shared by the whole session: treat its folder as read-only (copy it before changing files).
    """
    return train(TINY_TRAIN, load_dataset(TINY_DATASET), tmp_path_factory.mktemp("tiny_run"))


@cache
def redis_reachable(host: str = REDIS_HOST, port: int = REDIS_PORT) -> bool:
    """Whether a Redis answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> None:
    """Skip (or, under CI=true, fail) the current test when the real Redis is unreachable."""
    if redis_reachable():
        return
    reason = (
        f"needs a Redis server at {REDIS_HOST}:{REDIS_PORT} (start one with `redis-server --daemonize yes`)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("redis") is not None:
        require_redis()


@pytest.fixture
def redis_url() -> str:
    """Base URL of the real Redis (add a database number); skips or fails as `require_redis` says."""
    require_redis()
    return f"redis://{REDIS_HOST}:{REDIS_PORT}"


@pytest.fixture(scope="session")
def reference_store(tiny_run: TrainingRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_index_spec(tiny_run)` filled by the embedded runner: what every other way of filling
    it must reproduce byte for byte. Read-only."""
    from retrac.computers import GradientComputerCache
    from storage import GradientStore, run_pending
    from tests.storage.helpers import tiny_index_spec

    path = tmp_path_factory.mktemp("reference") / "index.zarr"
    store = GradientStore.create(path, tiny_index_spec(tiny_run))
    run_pending(store, GradientComputerCache("cpu", threads=1))
    return path
