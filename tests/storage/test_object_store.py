"""Stores in an S3-compatible bucket (moto's server on loopback): the same bytes and answers as a
local store, done marks that hide half-written shards, listing and deletion, and URLs or settings
that cannot work refused before anything is written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from api_schemas import QuerySpec
from cli import main
from retrac.computers import GradientComputerCache
from retrac.plan import pin_checkpoints
from retrac.replay import TrainingRun
from storage import (
    BucketLocation,
    BucketOptions,
    GradientStore,
    IncompleteStoreError,
    StoreError,
    attribute,
    delete_store,
    is_leftover,
    list_stores,
    locate,
    run_pending,
    run_shard,
)
from storage.inputs import InputCache
from tests.storage.helpers import store_bytes, tiny_index_spec
from tests.storage.object_store import S3Server, bucket_url, longest_wait, objects, silent_endpoint, upload

QUERY = QuerySpec(timesteps=6, draws=2, seed=4)
CPU = GradientComputerCache("cpu", threads=1)


def filled(location: object, run: TrainingRun) -> GradientStore:
    store = GradientStore.create(location, tiny_index_spec(run))  # type: ignore[arg-type]
    run_pending(store, CPU)
    return store


def uploaded(reference: Path, location: BucketLocation) -> GradientStore:
    """A byte copy of a local store put into the bucket (with boto3): a store there as well."""
    upload(reference, location.bucket, location.prefix)
    return GradientStore.open(location)


def answers(store: GradientStore, images: torch.Tensor) -> list[dict]:
    result = attribute(store, images, QUERY, top_k=5, models=CPU)
    return [r.model_dump() for r in result.results]


def test_a_store_in_a_bucket_holds_the_local_bytes_and_gives_the_local_answers(
    bucket: str, tiny_run: TrainingRun, reference_store: Path
) -> None:
    location = bucket_url(bucket, "stores/index.zarr")
    filled(location, tiny_run)
    assert store_bytes(location) == store_bytes(reference_store)  # chunks, digests, metadata
    reopened = GradientStore.open(f"s3://{bucket}/stores/index.zarr")
    local = GradientStore.open(reference_store)
    assert reopened.status(verify=True).complete
    for c in range(reopened.num_checkpoints):  # every done mark set, as in the local store
        assert (reopened.done_marks(c) > 0).all()
        assert (local.done_marks(c) > 0).all()
    images = local.plan.dataset.images[[3, 17]]
    streamed = GradientStore.open(location, resident_bytes=0)  # chunk by chunk from the bucket
    assert answers(reopened, images) == answers(local, images) == answers(streamed, images)


def test_a_half_written_shard_in_a_bucket_is_not_done_and_a_rerun_completes_it(
    bucket: str, tiny_run: TrainingRun, reference_store: Path
) -> None:
    location = bucket_url(bucket, "index.zarr")
    store = uploaded(reference_store, location)
    assert store.status(verify=True).complete
    # What a writer killed between its chunks and its done mark leaves: the pending mark, new chunks.
    store._array(1, "done_at")[2] = 0.0
    store._array(1, "norms")[store.shard_rows(2)] = np.ones((8, store.num_slots), dtype=np.float32)
    reader = GradientStore.open(location)  # another process would see exactly this
    assert reader.pending() == [(1, 2)]
    assert not reader.status(verify=True).complete
    with pytest.raises(IncompleteStoreError, match="checkpoint 1 has 1 of 6 shards not done"):
        list(reader.chunks([1]))
    assert run_shard(reader, 1, 2, CPU) is True
    assert store_bytes(location) == store_bytes(reference_store)


def test_a_missing_chunk_object_makes_its_shard_pending(bucket: str, reference_store: Path) -> None:
    location = bucket_url(bucket, "index.zarr")
    store = uploaded(reference_store, location)
    os_client_delete(location.bucket, f"{location.prefix}/checkpoints/0/seeds/c/3/0")
    assert GradientStore.open(location).pending() == [(0, 3)]
    assert store.is_done(0, 3) is False
    assert store.is_done(0, 2) is True


def os_client_delete(bucket_name: str, key: str) -> None:
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).delete_object(Bucket=bucket_name, Key=key)


def test_stores_in_a_bucket_are_listed_and_deleted_whole(bucket: str, tiny_run: TrainingRun) -> None:
    root = bucket_url(bucket, "stores")
    spec = tiny_index_spec(tiny_run)
    first = GradientStore.create(root.child("first"), spec)
    GradientStore.create(root.child("second"), spec)
    run_shard(first, 0, 0, CPU)
    assert list_stores(root) == ["first", "second"]
    assert first.size_bytes() == sum(len(data) for data in objects(root.child("first")).values())

    delete_store(root.child("first"))
    assert list_stores(root) == ["second"]
    assert objects(root.child("first")) == {}
    assert not is_leftover(root.child("first"))  # nothing left at all
    with pytest.raises(StoreError, match="not a retrac store"):
        GradientStore.open(root.child("first"))

    # A shard written after the deletion by a worker that had passed its checks: a leftover, not a
    # store; the name is free again once it is cleared.
    GradientStore.create(root.child("third"), spec)
    os_client_delete(bucket, f"{root.prefix}/third/zarr.json")
    assert is_leftover(root.child("third"))
    assert list_stores(root) == ["second"]
    with pytest.raises(StoreError, match="exists and is not a retrac store"):
        GradientStore.create(root.child("third"), spec)
    delete_store(root.child("third"))
    assert GradientStore.create(root.child("third"), spec).pending()[0] == (0, 0)
    assert list_stores(root) == ["second", "third"]


def test_a_store_opened_from_a_bucket_is_reopened_when_it_is_recreated(
    bucket: str, tiny_run: TrainingRun
) -> None:
    from storage import OpenStores

    url = f"s3://{bucket}/index.zarr"
    opened = OpenStores()
    first = GradientStore.create(url, tiny_index_spec(tiny_run))
    assert opened.get(url) is opened.get(url)
    delete_store(url)
    second = GradientStore.create(url, tiny_index_spec(tiny_run))
    assert opened.get(url).attrs["uid"] == second.attrs["uid"] != first.attrs["uid"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://Bad_Bucket/index", "is not a bucket name"),
        ("s3://retrac-stores", "give a prefix inside the bucket"),
        ("s3://retrac-stores/a/../b", "no '..'"),
        ("gs://retrac-stores/index", "only s3://BUCKET/PREFIX URLs and local folders"),
    ],
)
def test_urls_that_cannot_name_a_store_are_refused(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        locate(url)


def test_missing_credentials_are_refused_before_any_request() -> None:
    with pytest.raises(StoreError, match="no credentials for the object store; set AWS_ACCESS_KEY_ID"):
        locate("s3://retrac-stores/index", environment={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    given = BucketOptions(access_key_id="key", secret_access_key="secret")
    assert str(locate("s3://retrac-stores/index/", given, environment={})) == "s3://retrac-stores/index"


def test_an_unreachable_bucket_is_refused_at_create_in_one_line(
    s3_server: S3Server, tiny_run: TrainingRun
) -> None:
    with pytest.raises(StoreError, match="the object store did not answer as expected") as missing:
        GradientStore.create("s3://retrac-no-such-bucket/index", tiny_index_spec(tiny_run))
    assert "\n" not in str(missing.value)
    assert isinstance(missing.value, ConnectionError)  # a worker retries it with backoff


TIMEOUT_S = 1.0
"""The connect and read timeouts of the silent-server tests."""


def test_a_server_that_never_answers_fails_reads_and_mirrors_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with silent_endpoint(monkeypatch, TIMEOUT_S):
        from worker.settings import get_settings

        options = get_settings().bucket_options()
        for attempt in (
            lambda: GradientStore.open(locate("s3://retrac-silent/index", options)),
            lambda: InputCache(tmp_path / "cache", options=options).mirror("s3://retrac-silent/models/run"),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError, match="the object store is unreachable") as refused:
                attempt()
            assert time.monotonic() - started < longest_wait(TIMEOUT_S)
            assert "\n" not in str(refused.value)
            assert "s3://retrac-silent/" in str(refused.value)


def test_the_cli_gives_up_on_a_server_that_never_answers_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with silent_endpoint(monkeypatch, TIMEOUT_S):
        started = time.monotonic()
        assert main(["index", "status", "s3://retrac-silent/index"]) == 2
        assert time.monotonic() - started < longest_wait(TIMEOUT_S)
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert "retrac-silent/index: the object store is unreachable" in error, error


def test_the_cli_refuses_bad_store_urls_and_missing_credentials_with_one_line(
    s3_server: S3Server,
    tiny_run: TrainingRun,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["index", "create", "s3://retrac-stores", "--run", str(tiny_run.folder)]) == 2
    bad = capsys.readouterr().err
    assert bad.count("\n") == 1, bad
    assert "give a prefix inside the bucket" in bad, bad
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert main(["index", "create", "s3://retrac-stores/index", "--run", str(tiny_run.folder)]) == 2
    anonymous = capsys.readouterr().err
    assert anonymous.count("\n") == 1, anonymous
    assert "no credentials for the object store" in anonymous, anonymous


def test_the_cli_creates_a_store_in_a_bucket_and_reads_its_status(
    bucket: str,
    tiny_run: TrainingRun,
    reference_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(tiny_index_spec(tiny_run).model_dump_json())
    assert main(["index", "create", f"s3://{bucket}/new.zarr", "--spec", str(spec)]) == 0
    assert GradientStore.open(f"s3://{bucket}/new.zarr").spec == pin_checkpoints(tiny_index_spec(tiny_run))
    uploaded(reference_store, bucket_url(bucket, "full.zarr"))
    capsys.readouterr()
    assert main(["index", "status", f"s3://{bucket}/full.zarr", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["complete"]
    assert (report["done_rows"], report["total_rows"]) == (144, 144)


def test_approximate_search_reads_its_ann_index_from_the_bucket(
    bucket: str, tiny_run: TrainingRun, reference_store: Path
) -> None:
    store = filled(bucket_url(bucket, "ann.zarr"), tiny_run)  # the runner's last step builds the ANN index
    assert store.location.has("ann/manifest.json")
    local = GradientStore.open(reference_store)
    images = local.plan.dataset.images[[3, 17]]
    approximate = QUERY.model_copy(update={"search": "approximate"})
    got = attribute(store, images, approximate, top_k=5, models=CPU)
    want = attribute(local, images, approximate, top_k=5, models=CPU)
    assert got.search == "approximate"
    assert [r.model_dump() for r in got.results] == [r.model_dump() for r in want.results]
