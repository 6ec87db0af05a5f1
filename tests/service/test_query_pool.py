"""Query gradients computed by a pool of processes (`RETRAC_QUERY_POOL`): the same answers as in the
service process, a killed pool process fails its query with a 503 and is replaced, and two queries'
gradients run at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from api_schemas import QuerySpec
from retrac.computers import GradientComputerCache
from service.main import create_app
from service.query_pool import PROCESS_NAME, _answer, failure, openmp_environment
from service.repository import StoreRepository
from service.settings import Settings
from storage import OpenStores, StaleStoreError
from tests.service.conftest import API_KEY, HEAVY, INDEX, assert_wait_reported_apart, body, wait_until

STARTED_CPU_S = 0.1
"""CPU seconds a pool process spends on a query before it is killed: past receiving the request
(milliseconds), well before its gradients (about 0.5 CPU seconds for 4 images at K*M = 64) are done."""


def pool_processes() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == PROCESS_NAME]


@pytest.fixture(scope="module")
def pooled(settings: Settings, built_index: str) -> Iterator[TestClient]:
    """A client of an app whose query gradients a pool of 2 processes computes (its lifespan run)."""
    app = create_app(settings.model_copy(update={"query_pool": 2}))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        yield client
    assert not pool_processes(), "the app's shutdown left pool processes running"


def attribute(client: TestClient, request: dict) -> httpx.Response:
    return client.post(f"/v1/indexes/{INDEX}/attribute", json=request)


def answer(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    found = response.json()
    found.pop("timings")
    return found


def test_pool_answers_equal_the_service_process(pooled: TestClient, client: TestClient) -> None:
    requests = [body(1), body(2, images=3), {**body(3), "checkpoints": [1], "methods": ["retrac"]}]
    for request in requests:
        # JSON numbers parse back to the floats printed, so equal answers have the same bits of scores.
        assert answer(attribute(pooled, request)) == answer(attribute(client, request))


def test_two_queries_gradients_overlap_in_a_pool_of_two(pooled: TestClient) -> None:
    with ThreadPoolExecutor(2) as threads:
        list(threads.map(lambda seed: answer(attribute(pooled, body(seed))), (8, 9)))  # both warm
        pids = [p.pid for p in pool_processes()]
        sent = [
            threads.submit(lambda seed: answer(attribute(pooled, body(seed, 4, HEAVY))), s) for s in (10, 11)
        ]
        intervals = busy_intervals(pids, lambda: all(f.done() for f in sent))
        for future in sent:
            future.result()
    (first_start, first_end), (second_start, second_end) = intervals.values()
    overlap = min(first_end, second_end) - max(first_start, second_start)
    shorter = min(first_end - first_start, second_end - second_start)
    # One after the other, the intervals would meet within a clock tick or two; at once, they share most.
    assert overlap > shorter / 2, intervals


def busy_intervals(pids: list[int], done: Callable[[], bool]) -> dict[int, tuple[float, float]]:
    """(first, last) time each process's CPU time grew by more than `STARTED_CPU_S` / 4 over its own
    start, sampled until `done()`: the span of its query's gradients."""
    start = {pid: cpu_seconds(pid) for pid in pids}
    seen: dict[int, list[float]] = {pid: [] for pid in pids}
    last = dict(start)
    while not done():
        now = time.perf_counter()
        for pid in pids:
            cpu = cpu_seconds(pid)
            if cpu - start[pid] > STARTED_CPU_S / 4 and cpu > last[pid]:
                seen[pid].append(now)
            last[pid] = cpu
        time.sleep(0.005)
    assert all(seen.values()), f"a pool process computed nothing: {seen}"
    return {pid: (times[0], times[-1]) for pid, times in seen.items()}


def test_a_killed_pool_process_fails_its_query_and_is_replaced(pooled: TestClient) -> None:
    with ThreadPoolExecutor(2) as threads:  # both processes have their models loaded
        list(threads.map(lambda seed: answer(attribute(pooled, body(seed))), (4, 5)))
    before = {p.pid for p in pool_processes()}
    assert len(before) == 2
    cpu = {pid: cpu_seconds(pid) for pid in before}
    responses: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: responses.append(attribute(pooled, body(6, 4, HEAVY))))
    sender.start()
    busy = wait_for_busy(cpu, sender)
    os.kill(busy, signal.SIGKILL)
    sender.join()
    (response,) = responses
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    assert f"pid {busy}" in detail, detail
    assert "SIGKILL" in detail, detail
    assert "send the query again" in detail, detail
    answer(attribute(pooled, body(7)))
    after = {p.pid for p in pool_processes()}
    assert len(after) == 2
    assert busy not in after


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_busy(cpu: dict[int, float], sender: threading.Thread) -> int:
    """The pid of the pool process that has spent `STARTED_CPU_S` on the query being sent."""
    while sender.is_alive():
        for pid, then in cpu.items():
            if cpu_seconds(pid) - then >= STARTED_CPU_S:
                return pid
        time.sleep(0.01)
    raise AssertionError("the query was answered before a pool process could be killed")


def test_a_query_behind_busy_pool_processes_reports_its_wait_apart(pooled: TestClient) -> None:
    with ThreadPoolExecutor(2) as threads:  # both processes have their models loaded
        list(threads.map(lambda seed: answer(attribute(pooled, body(seed))), (12, 13)))
    pids = [p.pid for p in pool_processes()]

    def computing() -> Callable[[], None]:
        before = {pid: cpu_seconds(pid) for pid in pids}
        return lambda: wait_until(lambda: all(cpu_seconds(p) - c >= STARTED_CPU_S for p, c in before.items()))

    assert_wait_reported_apart(pooled, [body(14, 4, HEAVY), body(15, 4, HEAVY)], body(16), computing)


def test_pool_processes_start_with_their_threads_and_a_passive_openmp_wait(
    pooled: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for process in pool_processes():
        with open(f"/proc/{process.pid}/environ") as environ:
            started = dict(v.split("=", 1) for v in environ.read().split("\0") if "=" in v)
        assert started["OMP_NUM_THREADS"] == str(settings.torch_threads)
        assert started["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # an operator's own choice is kept
    assert openmp_environment(3) == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}


def test_a_store_created_again_under_the_query_is_refused_as_stale(
    settings: Settings, built_index: str
) -> None:
    """The pool process computes for the store the service opened (its uid), never for a later one at
    the same location: the service would scan the old rows with the new store's query vectors."""
    store = StoreRepository(settings).open(INDEX)
    images = store.plan.dataset.images[:1]
    request = (str(store.location), "another-uid", images, QuerySpec(timesteps=2, draws=1).model_dump_json(),
               [0], {})
    status, (kind, message) = _answer(request, GradientComputerCache("cpu", threads=1), OpenStores())
    assert (status, kind) == ("failed", "storage.errors.StaleStoreError")
    assert isinstance(failure(kind, message, pid=None), StaleStoreError)
    assert "deleted and created again while this query ran" in message
