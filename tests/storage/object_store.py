"""A real S3-compatible server on loopback for the object-store tests: moto's server mode in a
process of its own (PyPI `moto[server]`), reached through the AWS environment variables, so that
worker subprocesses started by a test reach it the same way. Each test gets a bucket of its own.

The fixtures `s3_server` and `bucket` are registered for every test package by tests/conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from storage import BucketLocation, locate
from storage.location import RETRIES

STARTUP_SECONDS = 30
BACKOFF_S = 0.1 * (2**RETRIES - 1)
"""The backend's waits between the attempts of one request, at most (100 ms, doubling)."""
LOAD_MARGIN_S = 10.0
"""Time for everything but the waits themselves on a loaded machine (a query's setup, a command's imports
are outside the bound: it starts once the call is made)."""


def longest_wait(timeout: float) -> float:
    """The longest a request to a server that never answers may take, with `timeout` seconds for each
    of its attempts: every attempt times out, then the backoff between them."""
    return (RETRIES + 1) * timeout + BACKOFF_S + LOAD_MARGIN_S


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    environment: dict[str, str]
    """The AWS variables that point a process at this server (also set in this process)."""

    def client(self):  # noqa: ANN201 (boto3's client types are generated at run time)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


def _answers(endpoint: str) -> bool:
    host, port = endpoint.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def moto_server(logs: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """moto's S3 server on a free loopback port until the block ends: its endpoint and process (a
    test may stop it early, to see what an unreachable store does)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = (logs / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while process.poll() is None and not _answers(endpoint):
            if time.monotonic() > deadline:
                raise AssertionError(f"moto's server did not answer within {STARTUP_SECONDS} s")
            time.sleep(0.1)
        if process.poll() is not None:
            raise AssertionError(f"moto's server exited: see {log.name}")
        yield endpoint, process
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port for the whole session, and the AWS variables to
    reach it in `os.environ` (restored afterwards)."""
    with moto_server(tmp_path_factory.mktemp("moto")) as (endpoint, _):
        environment = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "retrac-test",
            "AWS_SECRET_ACCESS_KEY": "retrac-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
        saved = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        try:
            yield S3Server(endpoint, environment)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A new, empty bucket of this test alone; its name."""
    name = f"retrac-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def bucket_url(bucket: str, prefix: str) -> BucketLocation:
    location = locate(f"s3://{bucket}/{prefix}")
    assert isinstance(location, BucketLocation)
    return location


def objects(location: BucketLocation) -> dict[str, bytes]:
    """Every object under the location's prefix, by key relative to it, read with boto3 (not with
    the code under test)."""
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=location.bucket, Prefix=f"{location.prefix}/"
    ):
        for item in page.get("Contents", []):
            key = item["Key"]
            found[key.removeprefix(f"{location.prefix}/")] = client.get_object(
                Bucket=location.bucket, Key=key
            )["Body"].read()
    return found


def upload(folder: Path, bucket: str, prefix: str) -> None:
    """Put every file under `folder` into `bucket` under `prefix`, with boto3 (not the code under test)."""
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for key, data in files(folder).items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a local store, by path relative to it."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


class FreezingProxy:
    """A TCP proxy on loopback in front of the S3 server that forwards everything until a request
    line contains `trigger`, and from then on forwards nothing more: a client caught between two
    writes, as a worker is when it dies in the middle of a shard, but at a point the test chooses.
    """

    def __init__(self, endpoint: str, trigger: bytes) -> None:
        host, port = endpoint.removeprefix("http://").split(":")
        self.upstream, self.trigger = (host, int(port)), trigger
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if requests and self.trigger in data:
                    self.frozen.set()
                if self.frozen.is_set():
                    continue  # swallowed: the client waits for an answer that never comes
                target.sendall(data)
        except OSError:
            pass


class SilentServer:
    """A TCP server on loopback that accepts every connection and never sends a byte: an endpoint
    that is up (no connection refused) but never answers, as a hung or overloaded S3 server is."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for connection in self.connections:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)  # kept open, read from never


@contextmanager
def silent_endpoint(monkeypatch: pytest.MonkeyPatch, timeout: float) -> Iterator[str]:
    """A `SilentServer`, and the RETRAC_S3_* settings that reach it with `timeout` seconds to connect
    and to wait for an answer (in the environment, read afresh by the CLI): its endpoint."""
    server = SilentServer()
    settings = {"ENDPOINT_URL": server.endpoint, "REGION": "us-east-1", "ACCESS_KEY_ID": "k"}
    settings |= {"SECRET_ACCESS_KEY": "s", "ALLOW_HTTP": "true"}
    settings |= {"CONNECT_TIMEOUT": str(timeout), "READ_TIMEOUT": str(timeout)}
    for name, value in settings.items():
        monkeypatch.setenv(f"RETRAC_S3_{name}", value)
    monkeypatch.setattr("worker.settings._current", None)
    try:
        yield server.endpoint
    finally:
        server.close()
