"""The OpenAPI schema declares the API key on exactly the operations that refuse a request without it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings


def declared_and_refused(settings: Settings) -> tuple[set[str], set[str]]:
    """(operations whose schema names the key, operations that answer 401 without it) of one app
    (on a stores root of its own: without a key, a DELETE would really delete)."""
    client = TestClient(create_app(settings))
    schema = client.get("/openapi.json").json()
    declared, refused = set(), set()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            name = f"{method.upper()} {path}"
            if operation.get("security"):
                declared.add(name)
            url = path.replace("{name}", "digits").replace("{job_id}", "no-job").replace("{sample_id}", "x")
            if client.request(method.upper(), url).status_code == 401:
                refused.add(name)
    return declared, refused


WRITES = {"POST /v1/indexes", "DELETE /v1/indexes/{name}", "POST /v1/jobs", "DELETE /v1/jobs/{job_id}"}


@pytest.mark.parametrize("protect_queries", [False, True])
def test_the_key_is_declared_where_it_is_required(own_roots: Settings, protect_queries: bool) -> None:
    app_settings = own_roots.model_copy(update={"protect_queries": protect_queries})
    declared, refused = declared_and_refused(app_settings)
    assert declared == refused
    if protect_queries:
        assert declared > WRITES
        assert "GET /v1/indexes" in declared
        assert "GET /v1/health" not in declared
    else:
        assert declared == WRITES


def test_no_key_is_declared_when_none_is_configured(own_roots: Settings) -> None:
    declared, refused = declared_and_refused(own_roots.model_copy(update={"api_key": None}))
    assert declared == refused == set()
