"""Metrics, request ids and log lines of the service: `/metrics` counted against the answers it served,
`X-Request-ID` on every answer, JSON log lines from a real `retrac serve` process over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from service.settings import Settings
from storage import GradientStore
from tests.service.conftest import API_KEY, INDEX, body
from tests.service.servers import free_port
from tests.worker.conftest import wait_until


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics`, by name and sorted labels."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def test_metrics_count_the_queries_their_phases_and_the_requests_by_route(
    settings: Settings, built_index: str
) -> None:
    client = TestClient(create_app(settings), headers={"X-API-Key": API_KEY})
    answers = [client.post(f"/v1/indexes/{INDEX}/attribute", json=body(seed, images=2)) for seed in (1, 2)]
    assert all(a.status_code == 200 for a in answers)
    assert client.get("/v1/indexes/no-such-index").status_code == 404
    seen = samples(client)

    for method in ("tracin", "retrac"):  # 2 requests x 2 images, per method asked for
        labels = (("estimator", "paper"), ("index", INDEX), ("method", method))
        assert seen[("retrac_attribution_queries_total", labels)] == 4
    for phase, field in (("wait", "wait_s"), ("gradients", "gradient_s"), ("scan", "scan_s")):
        assert seen[("retrac_query_phase_seconds_count", (("phase", phase),))] == 2
        total = sum(a.json()["timings"][field] for a in answers)
        summed = seen[("retrac_query_phase_seconds_sum", (("phase", phase),))]
        assert summed == pytest.approx(total, rel=1e-12)  # the same floats, added in the same order
    route = (("method", "POST"), ("route", "/v1/indexes/{name}/attribute"), ("status", "200"))
    assert seen[("retrac_http_request_duration_seconds_count", route)] == 2
    missing = (("method", "GET"), ("route", "/v1/indexes/{name}"), ("status", "404"))
    assert seen[("retrac_http_request_duration_seconds_count", missing)] == 1
    assert seen[("retrac_query_pool_processes", ())] == seen[("retrac_query_pool_busy", ())] == 0

    # the first lookup of the index opened it, the second found it opened; the 404 opened nothing
    assert seen[("retrac_store_cache_lookups_total", (("result", "miss"),))] == 1
    assert seen[("retrac_store_cache_lookups_total", (("result", "hit"),))] == 1
    store = GradientStore.open(settings.stores_root / INDEX)  # type: ignore[operator]
    itemsize = 4 if store.spec.dtype in ("float32", "float16") else 2  # float16 widens to float32 if all fit
    # projected, norms (float32), timesteps and seeds (int64)
    per_checkpoint = store.num_rows * store.num_slots * (store.dim * itemsize + 4 + 8 + 8)
    expected = store.num_checkpoints * per_checkpoint
    assert seen[("retrac_store_resident_bytes", (("index", INDEX),))] == expected


def test_every_answer_carries_a_request_id_errors_included(settings: Settings, built_index: str) -> None:
    app = create_app(settings)

    @app.get("/v1/broken")
    def broken() -> None:
        raise RuntimeError("a bug")

    client = TestClient(app, headers={"X-API-Key": API_KEY}, raise_server_exceptions=False)
    sent = {"X-Request-ID": "trace-01:ab.CD_9"}
    for answer in (
        client.get("/v1/indexes", headers=sent),
        client.get("/v1/indexes/no-such-index", headers=sent),
        client.post(f"/v1/indexes/{INDEX}/attribute", json={"images": []}, headers=sent),
        client.get("/v1/broken", headers=sent),
    ):
        assert answer.headers["X-Request-ID"] == sent["X-Request-ID"], answer.status_code
    assert client.get("/v1/broken", headers=sent).status_code == 500
    made = {client.get("/v1/health").headers["X-Request-ID"] for _ in range(3)}
    assert len(made) == 3
    assert all(len(rid) == 32 for rid in made)
    for unusable in ("x" * 129, "two words", "semi;colon"):  # too long or outside the id alphabet: replaced
        got = client.get("/v1/health", headers={"X-Request-ID": unusable}).headers["X-Request-ID"]
        assert got != unusable
        assert len(got) == 32


def test_query_knobs_the_index_fixes_are_optional_in_the_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["AttributeRequest"]
    for knob in ("timesteps", "draws", "seed"):
        assert "default" not in request["properties"][knob]
        assert knob not in request.get("required", [])
        assert {"type": "null"} in request["properties"][knob]["anyOf"]
    ids = sorted(op["operationId"] for ops in schema["paths"].values() for op in ops.values())
    assert {"attribute", "attribute_upload", "list_indexes", "create_index", "read_job"} <= set(ids)
    assert len(ids) == len(set(ids))
    assert max(len(i) for i in ids) <= 20
    image = {"array": np.random.default_rng(3).random((8, 8)).round(3).tolist()}
    given = {"images": [image], "estimator": "paper", "timesteps": 8}  # 8 x 4 draws: within the test limit
    left_out = client.post(f"/v1/indexes/{INDEX}/attribute", json=given)
    nulls = client.post(f"/v1/indexes/{INDEX}/attribute", json={**given, "draws": None, "seed": None})
    assert left_out.status_code == nulls.status_code == 200, left_out.text
    assert (left_out.json()["timesteps"], left_out.json()["draws"], left_out.json()["seed"]) == (8, 4, 0)
    assert left_out.json()["data"] == nulls.json()["data"]


def test_json_logs_from_a_real_server_carry_the_request_id(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    environment = {
        **os.environ,
        "RETRAC_STORES_ROOT": str(tmp_path),
        "RETRAC_LOG_FORMAT": "json",
        "RETRAC_BROKER_URL": "redis://127.0.0.1:1/0",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return server.poll() is None and False

    try:
        wait_until(answers, 120, "retrac serve to answer")
        assert httpx.get(f"{base}/v1/indexes/absent", headers={"X-Request-ID": "abc-123"}).status_code == 404
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line is one object
    (access,) = [line for line in lines if line.get("request_id") == "abc-123"]
    assert {k: access[k] for k in ("level", "method", "path", "status", "index")} == {
        "level": "INFO",
        "method": "GET",
        "path": "/v1/indexes/absent",
        "status": 404,
        "index": "absent",
    }
    assert access["duration_s"] > 0
    assert access["timestamp"].endswith("+00:00")
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines as JSON too
