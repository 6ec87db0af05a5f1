"""Indexing jobs into an S3-compatible bucket (moto's server on loopback) by real worker processes
that share nothing with the submitter but Redis and the bucket: the store they build is the embedded
local one, byte for byte, and a worker killed in the middle of writing a shard leaves it invisible."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import boto3
import numpy as np
import pytest
from celery.result import GroupResult

from retrac.replay import TrainingRun
from storage import BucketLocation, GradientStore, IncompleteStoreError
from tests.storage.helpers import store_bytes, tiny_index_spec
from tests.storage.object_store import FreezingProxy, S3Server, bucket_url, objects
from tests.worker.conftest import Workers, wait_until
from worker import control
from worker.app import app

pytestmark = pytest.mark.redis

JOB_SECONDS = 90
SHARDS = 18  # 3 checkpoints x 6 shards
PENDING_MARK = '"' + hashlib.md5(np.zeros(1, dtype=np.float64).tobytes()).hexdigest() + '"'
"""The ETag of a done mark that reads 0: written first when a shard is (re)written, replaced last."""
DONE_MARK_KEY = re.compile(r"checkpoints/(\d+)/done_at/c/(\d+)")


def fresh_store(bucket_name: str, run: TrainingRun) -> BucketLocation:
    location = bucket_url(bucket_name, "jobs/index.zarr")
    GradientStore.create(location, tiny_index_spec(run))
    return location


def assert_same_as_embedded(location: BucketLocation, reference: Path) -> None:
    store = GradientStore.open(location)
    assert store.status(verify=True).complete
    assert all((store.done_marks(c) > 0).all() for c in range(store.num_checkpoints))
    assert store_bytes(location) == store_bytes(reference)


def shards_being_written(s3_server: S3Server, location: BucketLocation) -> set[tuple[int, int]]:
    """(checkpoint, shard) whose done-mark object holds the pending 0: one listing, read by ETag."""
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=location.bucket, Prefix=f"{location.prefix}/checkpoints/")
    found = set()
    for item in listed.get("Contents", []):
        mark = DONE_MARK_KEY.fullmatch(item["Key"].removeprefix(f"{location.prefix}/"))
        if mark and item["ETag"] == PENDING_MARK:
            found.add((int(mark[1]), int(mark[2])))
    return found


def test_two_workers_fill_a_store_in_a_bucket_with_the_local_bytes(
    bucket: str, tiny_run: TrainingRun, reference_store: Path, workers: Workers, queue: str
) -> None:
    location = fresh_store(bucket, tiny_run)
    workers.start("left", wait=False)
    workers.start("right", wait=False)
    workers.wait_ready("left")
    workers.wait_ready("right")
    job = control.submit(str(location), queue=queue)
    wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job")
    outcomes = [task.result for task in GroupResult.restore(job, app=app).results]
    assert [r["status"] for r in outcomes] == ["computed"] * SHARDS
    assert len({r["worker"] for r in outcomes}) == 2  # both took part
    assert_same_as_embedded(location, reference_store)
    done = control.progress(str(location))
    assert (done.done_rows, done.total_rows) == (144, 144)


def test_a_worker_killed_mid_shard_leaves_it_invisible_and_the_rerun_completes_it(
    s3_server: S3Server,
    bucket: str,
    tiny_run: TrainingRun,
    reference_store: Path,
    workers: Workers,
    queue: str,
) -> None:
    location = fresh_store(bucket, tiny_run)
    # The doomed worker reaches the bucket through a proxy that stops at its first `norms` chunk:
    # its first shard then has its pending mark and its `projected` chunk written, nothing more.
    proxy = FreezingProxy(s3_server.endpoint, trigger=b"/norms/c/")
    try:
        job = control.submit(str(location), queue=queue)
        # (frozen in its task, a solo worker cannot answer pings: not waited for)
        workers.start("doomed", wait=False, RETRAC_VISIBILITY_TIMEOUT="3", AWS_ENDPOINT_URL=proxy.endpoint)
        wait_until(proxy.frozen.is_set, JOB_SECONDS, "the doomed worker to start writing a shard")
        wait_until(lambda: bool(shards_being_written(s3_server, location)), 10, "the pending mark")
        workers.kill("doomed")
    finally:
        proxy.close()
    half = shards_being_written(s3_server, location)
    assert len(half) == 1
    (checkpoint, shard), = half
    keys = set(objects(location))
    assert f"checkpoints/{checkpoint}/projected/c/{shard}/0/0" in keys  # half written...
    assert f"checkpoints/{checkpoint}/norms/c/{shard}/0" not in keys

    reader = GradientStore.open(location)  # ...and invisible: not done, pending, not scanned
    assert not reader.is_done(checkpoint, shard)
    assert (checkpoint, shard) in reader.pending()
    assert not control.progress(str(location)).complete
    with pytest.raises(IncompleteStoreError):
        list(reader.chunks([checkpoint]))
    # The rescuer's AWS variables lead nowhere: it reaches the bucket by its RETRAC_S3_* settings.
    workers.start(
        "rescuer",
        RETRAC_VISIBILITY_TIMEOUT="3",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        RETRAC_S3_ENDPOINT_URL=s3_server.endpoint,
    )
    wait_until(lambda: control.state(job) == "done", JOB_SECONDS, "the job to complete after the kill")
    assert_same_as_embedded(location, reference_store)


def test_a_pending_done_mark_is_recognised_by_its_etag(s3_server: S3Server, bucket: str) -> None:
    """The check the kill test relies on: a done mark that reads 0 is told from its ETag alone."""
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="a/checkpoints/0/done_at/c/1", Body=np.zeros(1).tobytes())
    assert shards_being_written(s3_server, bucket_url(bucket, "a")) == {(0, 1)}
