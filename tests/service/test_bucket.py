"""The service with its indexes in an S3-compatible bucket (moto's server on loopback): the API and a
worker that share nothing but Redis and the bucket create, list, index, query and delete an index over
HTTP; and a bucket that stops answering is a 503 (and a one-line CLI error) that names the store."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api_schemas.attribution import AttributionsPublic
from api_schemas.indexes import IndexCreate
from api_schemas.jobs import JobPublic
from cli import main
from retrac.attribution import Attributor
from retrac.computers import GradientComputerCache
from retrac.exceptions import SpecError
from retrac.plan import IndexPlan
from retrac.replay import TrainingRun
from service.main import create_app
from service.repository import StoreRepository
from service.settings import Settings
from storage import run_pending
from tests.service.conftest import API_KEY, QUERY, index_spec
from tests.service.test_attribute import assert_matches, digit_pixels, expected, png
from tests.service.test_end_to_end import JOB_SECONDS, Server, service_environment
from tests.storage.helpers import inputs_spec, put_inputs
from tests.storage.object_store import (
    S3Server,
    bucket_url,
    longest_wait,
    moto_server,
    objects,
    silent_endpoint,
)
from tests.worker.conftest import STARTUP_SECONDS, Workers, wait_until

ROOT = "indexes"
"""The prefix of the stores root in the test's bucket."""


@pytest.fixture
def bucket_deployment(
    tmp_path: Path, tiny_run: TrainingRun, redis_url: str, bucket: str, s3_server: S3Server
) -> Iterator[Server]:
    """`retrac serve` with its stores, models and data roots in `bucket`, and one worker that knows no
    roots at all: the two share the queue's Redis and the bucket, nothing else (each mirrors the
    inputs into a cache of its own)."""
    queue = f"retrac-bucket-test-{uuid.uuid4().hex[:10]}"
    put_inputs(bucket, tiny_run, tmp_path / "local")
    env, _ = service_environment(tmp_path, tiny_run, queue)
    for root, prefix in (("STORES", ROOT), ("MODELS", "models"), ("DATA", "data")):
        env[f"RETRAC_{root}_ROOT"] = f"s3://{bucket}/{prefix}"
    env["RETRAC_INPUT_CACHE"] = str(tmp_path / "server-cache")
    workers = Workers(queue, tmp_path)
    server = Server(env, tmp_path / "server.log")
    try:
        workers.start("worker", RETRAC_INPUT_CACHE=str(tmp_path / "worker-cache"))
        wait_until(server.ready, STARTUP_SECONDS, f"retrac serve to be ready (log: {server.log})")
        yield server
    finally:
        server.stop()
        workers.stop_all()
        redis.Redis.from_url(env["RETRAC_BROKER_URL"]).delete(queue)


@pytest.mark.redis
@pytest.mark.slow
def test_an_index_in_a_bucket_is_created_built_queried_and_deleted_over_http(
    bucket_deployment: Server, bucket: str, tiny_run: TrainingRun, tmp_path: Path
) -> None:
    api = httpx.Client(base_url=f"{bucket_deployment.url}/v1", headers={"X-API-Key": API_KEY}, timeout=300)
    ready = api.get("/ready").json()
    assert ready["checks"]["stores"] == {
        "ok": True,
        "detail": f"the object store holding s3://{bucket}/{ROOT} answers",
    }

    spec = inputs_spec("run", "digits.npz")  # relative: inside the models and data roots, in the bucket
    created = api.post("/indexes", json={"name": "digits", "spec": spec.model_dump(mode="json")})
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    assert created.json()["spec"]["checkpoints"][0]["path"] == f"s3://{bucket}/models/run/checkpoints/epoch-0002"
    in_bucket = objects(bucket_url(bucket, ROOT))  # read with boto3, not through retrac
    assert "digits/zarr.json" in in_bucket
    assert f'"job_id": "{job_id}"' in in_bucket[".jobs/digits.json"].decode()

    def job() -> JobPublic:
        response = api.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return JobPublic.model_validate(response.json())

    wait_until(lambda: job().state == "done", JOB_SECONDS, "the indexing job")
    assert (job().done, job().total, job().index) == (48 * 3, 48 * 3, "digits")
    listed = api.get("/indexes").json()
    assert [i["name"] for i in listed["data"]] == ["digits"]
    assert listed["broken"] == []
    assert listed["data"][0]["complete"] is True
    assert listed["data"][0]["job_id"] == job_id
    assert any((tmp_path / "worker-cache").iterdir())  # the worker read the inputs from the bucket

    local = inputs_spec(str(tiny_run.folder), str(tmp_path / "local/data/digits.npz"))
    reference = Attributor(IndexPlan.resolve(local))
    reference.index()
    pixels = digit_pixels(reference, 4)
    response = api.post(
        "/indexes/digits/attribute/upload", files={"images": ("q.png", png(pixels), "image/png")}, data=QUERY
    )
    assert response.status_code == 200, response.text
    assert_matches(AttributionsPublic.model_validate(response.json()), expected(reference, [pixels]))

    assert api.delete("/indexes/digits").status_code == 204
    assert objects(bucket_url(bucket, ROOT)) == {}  # the store and its job record
    assert api.get("/indexes/digits").status_code == 404
    assert api.get(f"/jobs/{job_id}").status_code == 404
    assert api.get("/indexes").json()["count"] == 0


@pytest.fixture
def stopping_bucket(
    tmp_path: Path, own_roots: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    """Settings whose stores root is a bucket on a moto server of this test alone, reached by the
    RETRAC_S3_* settings (also in the environment, for the CLI), holding the complete index `digits`;
    and that server's process, to stop."""
    with moto_server(tmp_path) as (endpoint, process):
        name = f"retrac-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="k",
            aws_secret_access_key="s",
        ).create_bucket(Bucket=name)
        reach = {"endpoint_url": endpoint, "region": "us-east-1", "access_key_id": "k",
                 "secret_access_key": "s"}
        for key, value in {**reach, "allow_http": "true"}.items():
            monkeypatch.setenv(f"RETRAC_S3_{key.upper()}", value)
        monkeypatch.setattr("worker.settings._current", None)  # the CLI reads them afresh
        settings = own_roots.model_copy(
            update={
                "stores_root": f"s3://{name}/{ROOT}",
                **{f"s3_{key}": value for key, value in reach.items() if key != "secret_access_key"},
                "s3_secret_access_key": SecretStr("s"),
                "s3_allow_http": True,
            }
        )
        store = StoreRepository(settings).create(IndexCreate(name="digits", spec=index_spec()))
        run_pending(store, GradientComputerCache("cpu", threads=1))
        yield settings, process


def test_a_bucket_that_stops_answering_is_a_503_naming_the_store(
    stopping_bucket: tuple[Settings, subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, process = stopping_bucket
    client = TestClient(create_app(settings), headers={"X-API-Key": API_KEY})
    image = {"images": [{"array": [[0.5] * 8] * 8}], **QUERY}
    assert client.get("/v1/indexes").json()["count"] == 1
    assert client.post("/v1/indexes/digits/attribute", json=image).status_code == 200

    process.kill()
    process.wait()
    root = str(settings.stores_root)
    for method, path, body, store in (
        ("GET", "/v1/indexes", None, root),
        ("GET", "/v1/indexes/digits", None, f"{root}/digits"),
        ("POST", "/v1/indexes/digits/attribute", image, f"{root}/digits"),
        ("DELETE", "/v1/indexes/digits", None, f"{root}/digits"),
    ):
        response = client.request(method, path, json=body)
        assert response.status_code == 503, (path, response.text)
        detail = response.json()["detail"]
        assert detail.startswith(f"{store}: the object store is unreachable"), detail
        assert "\n" not in detail, detail
    ready = client.get("/v1/ready")
    assert ready.status_code == 503
    assert "unreachable" in ready.json()["checks"]["stores"]["detail"]

    assert main(["index", "status", f"{root}/digits"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"{root}/digits: the object store is unreachable" in error, error


def test_a_bucket_server_that_never_answers_is_a_503_naming_the_store_in_bounded_time(
    own_roots: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = 1.0
    with silent_endpoint(monkeypatch, timeout) as endpoint:
        settings = own_roots.model_copy(
            update={
                "stores_root": f"s3://retrac-silent/{ROOT}",
                "s3_endpoint_url": endpoint,
                "s3_access_key_id": "k",
                "s3_secret_access_key": SecretStr("s"),
                "s3_allow_http": True,
                "s3_connect_timeout": timeout,
                "s3_read_timeout": timeout,
            }
        )
        client = TestClient(create_app(settings), headers={"X-API-Key": API_KEY})
        image = {"images": [{"array": [[0.5] * 8] * 8}], **QUERY}
        root = str(settings.stores_root)
        for method, path, body, store in (
            ("GET", "/v1/indexes", None, root),
            ("POST", "/v1/indexes/digits/attribute", image, f"{root}/digits"),
        ):
            started = time.monotonic()
            response = client.request(method, path, json=body)
            assert time.monotonic() - started < longest_wait(timeout), path
            assert response.status_code == 503, (path, response.text)
            detail = response.json()["detail"]
            assert detail.startswith(f"{store}: the object store is unreachable"), detail
            assert "\n" not in detail


def test_client_paths_stay_inside_roots_that_are_bucket_urls(own_roots: Settings) -> None:
    url_roots = own_roots.model_copy(update={"models_root": "s3://retrac-models/m", "data_root": "s3://retrac-data/d"})
    confined = StoreRepository(url_roots).confine(inputs_spec("run", "sets/digits.npz"))
    assert confined.checkpoints[0].path == "s3://retrac-models/m/run/checkpoints/epoch-0002"
    assert confined.scheduler == "s3://retrac-models/m/run/scheduler"
    assert confined.dataset.source == "s3://retrac-data/d/sets/digits.npz"
    assert StoreRepository(url_roots).confine(inputs_spec("s3://retrac-models/m/run", "x.npz")).scheduler == (
        "s3://retrac-models/m/run/scheduler"
    )
    for run, dataset in (
        ("../m2/run", "x.npz"),  # out through '..'
        ("run", "a/../../d2/x.npz"),
        ("s3://retrac-models/m2/run", "x.npz"),  # another prefix, given whole
        ("s3://other-bucket/m/run", "x.npz"),
        ("/etc/run", "x.npz"),
    ):
        with pytest.raises(SpecError, match="leaves the configured root"):
            StoreRepository(url_roots).confine(inputs_spec(run, dataset))
    with pytest.raises(SpecError, match="reads its inputs from folders"):  # local roots take no URLs
        StoreRepository(own_roots).confine(inputs_spec("s3://retrac-models/m/run", "x.npz"))
