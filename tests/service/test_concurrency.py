"""Twenty attribution requests at once all succeed and equal the same requests sent one by one, and a
query waiting for another's gradients reports that wait apart from its own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import anyio.to_thread
import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.service.conftest import API_KEY, HEAVY, INDEX, assert_wait_reported_apart, body, wait_until

REQUESTS = 20
STARTED_CPU_S = 0.1
"""CPU seconds this process spends past sending a heavy query once its gradients are under way: decoding
and checking it take milliseconds."""


async def send_all(app: FastAPI, concurrent: bool) -> list[dict]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://service", headers={"X-API-Key": API_KEY}, timeout=600
    ) as client:

        async def one(seed: int) -> dict:
            response = await client.post(f"/v1/indexes/{INDEX}/attribute", json=body(seed))
            assert response.status_code == 200, response.text
            answer = response.json()
            answer.pop("timings")
            return answer

        if concurrent:
            return list(await asyncio.gather(*(one(seed) for seed in range(REQUESTS))))
        return [await one(seed) for seed in range(REQUESTS)]


def test_concurrent_requests_equal_serial(app: FastAPI) -> None:
    serial = asyncio.run(send_all(app, concurrent=False))
    concurrent = asyncio.run(send_all(app, concurrent=True))
    assert concurrent == serial
    assert (
        len({json.dumps(a["data"]) for a in serial}) == REQUESTS
    )  # every answer differs: a mix-up would show


HEALTH_WAIT_S = 2.0
"""How long the probe may take while the thread pool is full: it must not queue behind queries
(the compose healthcheck allows 4 s)."""


async def health_with_a_full_thread_pool(app: FastAPI) -> int:
    """Hold every token of the thread pool that sync routes (queries) run on, then probe health."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        await limiter.acquire_on_behalf_of(holder)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            with anyio.fail_after(HEALTH_WAIT_S):
                return (await client.get("/v1/health")).status_code
    finally:
        for holder in holders:
            limiter.release_on_behalf_of(holder)


def test_health_answers_while_queries_fill_the_thread_pool(app: FastAPI) -> None:
    assert asyncio.run(health_with_a_full_thread_pool(app)) == 200


def test_a_query_behind_another_reports_its_wait_apart(client: TestClient) -> None:
    def computing() -> Callable[[], None]:
        before = time.process_time()  # the app runs in this process: its gradients are this CPU time
        return lambda: wait_until(lambda: time.process_time() - before >= STARTED_CPU_S)

    client.post(f"/v1/indexes/{INDEX}/attribute", json=body(0)).raise_for_status()  # models loaded
    assert_wait_reported_apart(client, [body(1, 4, HEAVY)], body(2), computing)
