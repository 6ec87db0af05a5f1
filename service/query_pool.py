"""`QueryPool`: query gradients computed by processes of their own, so that several run at once.

In one service process the query gradients of its requests run one at a time (a shared gradient
computer swaps its model's parameters while it runs). With `RETRAC_QUERY_POOL=N` the service starts N
spawn-context processes instead, each with its own model cache, its own opened stores (for their
plans: checkpoints, VAE, label mapping) and `RETRAC_TORCH_THREADS` torch threads, computing one query's
gradients at a time. The scans stay in the service process, so one resident copy of each store serves
every query of the pool, where N server processes (`retrac serve --workers N`) keep N copies.

What crosses the process boundary is the service's own data: the store's location, the decoded image
tensors, the resolved query as JSON, the checkpoints and the conditions' tensors; the answer is plain
tensors, or a failure's class name and message. A process that dies while computing (killed, out of
memory) fails that query with a 503 that says how it ended, and a new process takes its place for
the next query; one found dead while idle is replaced before it is given a query.

A pool process starts with `OMP_NUM_THREADS` at its thread count and `OMP_WAIT_POLICY=PASSIVE`
(unless the environment sets a wait policy): by default torch's OpenMP threads spin for about 3 ms
before sleeping whenever they wait, and a query's gradients are many small operations with Python
between them, so a second thread spun nearly the whole time. On a 2-core machine shared with other
jobs the spinning thread took the core the computing one needed: 2 threads used 3 times the CPU time
of one and took 3.5 times as long (docs/deployment.md). The service process's own threads were
spared only by accident: libgomp spins briefly once its threads outnumber the cores, which the many
request threads' teams made so there.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext, SpawnProcess

import torch

from api_schemas import QuerySpec
from retrac.attribution import QueryGradients
from retrac.computers import GradientComputerCache
from retrac.conditions import Conditions
from retrac.exceptions import RetracError
from retrac.query_side import QueryVectors
from service.exceptions import Unavailable
from service.settings import Settings
from storage import GradientStore, OpenStores, StaleStoreError, query_gradients

PROCESS_NAME = "retrac-query-gradients"
STOP_WAIT_S = 10.0
"""How long `close` waits for a process to finish its query before killing it."""
_ENVIRONMENT = threading.Lock()
"""Held while a pool process starts under its own environment variables (`_environment`)."""

Request = tuple[str, str, torch.Tensor, str, list[int], dict[str, torch.Tensor]]
"""(store location, the store's uid, images, query JSON, checkpoints, condition tensors by forward
keyword)."""
Answer = tuple[str, object]
"""("done", [(per_timestep, timestep_norms, bands) per checkpoint]) or ("failed", (class, message))."""


class ProcessDied(Exception):
    """The pool process computing a query ended before answering; the message says how."""


class QueryPool:
    """`size` processes computing query gradients, started by `start` and stopped by `close` (the
    app's lifespan); safe to share between the service's request threads."""

    def __init__(self, size: int, settings: Settings) -> None:
        if size < 1:
            raise ValueError(f"a query pool needs at least one process, got {size}")
        self.size, self._settings = size, settings
        self._context: SpawnContext = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[PoolProcess] = queue.Queue()
        self._running: set[PoolProcess] = set()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Start the processes; each loads models on its first query of a checkpoint."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for _ in range(self.size):
            self._idle.put(self._spawned())

    def close(self) -> None:
        """Stop every process: an idle one at once, a busy one once it has finished its query (up to
        `STOP_WAIT_S`)."""
        with self._lock:
            running, self._running, self._started = list(self._running), set(), False
        idle = set()
        while not self._idle.empty():
            idle.add(self._idle.get_nowait())
        for process in running:
            process.stop(now=process in idle)
        for process in running:
            process.join(STOP_WAIT_S)

    def busy(self) -> int:
        """Processes computing a query now (0 before `start`)."""
        return self.size - self._idle.qsize() if self._started else 0

    def gradients(self, store: GradientStore, on_wait: Callable[[float], None]) -> QueryGradients:
        """The pool as `storage.attribute`'s gradient step (`gradients=`) over `store`'s plan;
        `on_wait(s)` hears how long it waited for an idle process (part of the step's time, not of its
        gradients)."""
        location, uid = str(store.location), store.attrs["uid"]

        def compute(
            images: torch.Tensor, query: QuerySpec, checkpoints: Sequence[int], conditions: Conditions
        ) -> list[QueryVectors]:
            spec = QuerySpec.model_validate(query.model_dump(include=set(QuerySpec.model_fields)))
            request: Request = (
                location, uid, images.contiguous(), spec.model_dump_json(), list(checkpoints),
                dict(conditions.tensors),
            )
            return [QueryVectors(*tensors) for tensors in self._run(request, on_wait)]

        return compute

    def _run(
        self, request: Request, on_wait: Callable[[float], None]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The answer of the next idle process to `request` (waiting for one if all are busy, for
        `on_wait(s)` seconds)."""
        if not self._started:
            raise RuntimeError("the query pool was not started: the app's lifespan starts it")
        asked = time.perf_counter()
        process = self._idle.get()
        on_wait(time.perf_counter() - asked)
        try:
            if not process.alive():
                process = self._replaced(process)
            try:
                answer = process.run(request)
            except ProcessDied as died:
                process = self._replaced(process)
                raise Unavailable(
                    f"the process computing this query's gradients {died}; a new one has taken its place: "
                    "send the query again (if it happens again, the query may need more memory than the "
                    "service has: lower timesteps, draws or the number of images)"
                ) from None
        finally:
            self._idle.put(process)
        return answer

    def _spawned(self) -> PoolProcess:
        process = PoolProcess(self._context, self._settings)
        with self._lock:
            self._running.add(process)
        return process

    def _replaced(self, dead: PoolProcess) -> PoolProcess:
        with self._lock:
            self._running.discard(dead)
        dead.join(0)
        return self._spawned()


class PoolProcess:
    """One process of the pool and the pipe to it."""

    def __init__(self, context: SpawnContext, settings: Settings) -> None:
        self._connection, theirs = context.Pipe()
        self.process: SpawnProcess = context.Process(
            target=serve_gradients, args=(theirs, settings), name=PROCESS_NAME, daemon=True
        )
        with _environment(openmp_environment(settings.torch_threads)):
            self.process.start()
        theirs.close()

    def alive(self) -> bool:
        return self.process.is_alive()

    def run(self, request: Request) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The process's answer to `request`; ProcessDied if it ends first, the named engine error (or a
        RuntimeError naming it) if the gradients failed."""
        try:
            self._connection.send(request)
            ready = wait([self._connection, self.process.sentinel])
            if self._connection not in ready:
                raise ProcessDied(self._ending())
            status, value = self._connection.recv()
        except (EOFError, OSError):
            raise ProcessDied(self._ending()) from None
        if status == "failed":
            raise failure(*value, pid=self.process.pid)
        return value

    def _ending(self) -> str:
        """How the process ended, once it has: the signal that killed it or its exit status."""
        self.process.join(STOP_WAIT_S)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"(pid {self.process.pid}) was killed by {signal.Signals(-code).name}"
        return f"(pid {self.process.pid}) exited with status {code}"

    def stop(self, *, now: bool) -> None:
        """Close the pipe, so the process exits once it has answered the query it computes; `now`
        (an idle process, which may still be importing torch) terminates it too."""
        self._connection.close()
        if now:
            self.process.terminate()

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` for the process to exit, then kill it."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def openmp_environment(threads: int) -> dict[str, str]:
    """The OpenMP variables a pool process starts with: `threads` threads (torch sets them too; this
    sets every OpenMP runtime's first team), which sleep when they wait unless the environment says
    otherwise (`OMP_WAIT_POLICY`, or libgomp's `GOMP_SPINCOUNT`, which overrides the policy)."""
    return {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


@contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """`os.environ` with `variables` while the block runs (a spawned process inherits it when it
    starts; the runtimes read it once, as they load), as it was afterwards."""
    with _ENVIRONMENT:
        before = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value


def failure(kind: str, message: str, *, pid: int | None) -> Exception:
    """The error a pool process reported: the named engine error of that class (so the answer is the
    same 4xx as in the service process), else a RuntimeError naming it (a bug: a 500, logged)."""
    named = {f"{k.__module__}.{k.__qualname__}": k for k in _subclasses(RetracError)}
    if kind in named:
        return named[kind](message)
    return RuntimeError(f"query gradients failed in pool process {pid}: {kind}: {message}")


def _subclasses(kind: type[Exception]) -> list[type[Exception]]:
    found = [kind]
    for sub in kind.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def serve_gradients(connection: Connection, settings: Settings) -> None:
    """A pool process: answer each request on `connection` until the service closes it.

    Ctrl-C reaches the whole process group; the service stops its pool itself, so the pool ignores it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(settings.torch_threads)
    settings.use_input_cache()
    models = settings.gradient_computers()
    stores = OpenStores(settings.bucket_options())
    while True:
        try:
            request: Request = connection.recv()
        except EOFError:
            return
        connection.send(_answer(request, models, stores))


def _answer(request: Request, models: GradientComputerCache, stores: OpenStores) -> Answer:
    location, uid, images, query, checkpoints, conditions = request
    try:
        store = stores.get(location)
        if store.attrs["uid"] != uid:  # the service scans the rows of the store it opened, not of this one
            raise StaleStoreError(
                f"index {store.path.name!r} was deleted and created again while this query ran; send it again"
            )
        vectors = query_gradients(
            store, images, QuerySpec.model_validate_json(query), checkpoints, Conditions(conditions), models
        )
    except Exception as error:  # noqa: BLE001 - every failure goes back to the query that caused it
        return "failed", (f"{type(error).__module__}.{type(error).__qualname__}", str(error))
    return "done", [(v.per_timestep.cpu(), v.timestep_norms.cpu(), v.bands.cpu()) for v in vectors]
