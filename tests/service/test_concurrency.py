"""Twenty attribution requests at once all succeed and equal the same requests sent one by one."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
from fastapi import FastAPI

from tests.service.conftest import API_KEY, INDEX, QUERY

REQUESTS = 20


def request_body(seed: int) -> dict:
    """A different query image and seed per request, so a mixed-up answer would show."""
    pixels = np.random.default_rng(seed).random((8, 8)).round(3)
    return {**QUERY, "seed": seed, "images": [{"array": pixels.tolist()}]}


async def send_all(app: FastAPI, concurrent: bool) -> list[dict]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://service", headers={"X-API-Key": API_KEY}, timeout=600
    ) as client:

        async def one(seed: int) -> dict:
            response = await client.post(f"/v1/indexes/{INDEX}/attribute", json=request_body(seed))
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
