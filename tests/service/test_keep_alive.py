"""Error answers leave the connection usable: every bad request of the table, then a good query, on
one keep-alive connection to a real uvicorn on loopback."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.service.conftest import API_KEY, INDEX, QUERY
from tests.service.servers import serve_in_thread
from tests.service.test_bad_requests import CASES


def local_address(response: httpx.Response) -> tuple[str, int]:
    """The client side (host, port) of the TCP connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def test_every_error_answer_keeps_the_connection(app: FastAPI) -> None:
    with serve_in_thread(app) as url, httpx.Client(
        base_url=url, limits=httpx.Limits(max_connections=1), timeout=120
    ) as client:
        addresses = set()
        for case in CASES:
            headers = {"X-API-Key": API_KEY} if case.headers is None else case.headers
            send = dict(case.send)
            headers |= send.pop("headers", {})
            response = client.request(case.method.upper(), case.url, headers=headers, **send)
            assert response.status_code == case.status, (case.kind, response.text)
            assert "close" not in response.headers.get("connection", ""), case.kind
            addresses.add(local_address(response))
        good = client.post(
            f"/v1/indexes/{INDEX}/attribute",
            headers={"X-API-Key": API_KEY},
            json={**QUERY, "images": [{"array": [[0.5] * 8] * 8}]},
        )
        assert good.status_code == 200, good.text
        addresses.add(local_address(good))
    assert len(addresses) == 1  # one connection carried every request: none was closed on an error
