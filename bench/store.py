"""Benchmark: what the gradient store and the queue cost, for indexing and for a query's scan.

1. Indexing. A "tiny" UNet (16x16x1) indexes `--index-rows` digits with 2 grid slots and a k=4096
   count sketch, in shards of 256 rows:
   - engine: `IndexPlan.compute_rows` over the same shards in this process, nothing stored (timed
     before and after the end-to-end run, as the machine's load drifts);
   - index: end to end, from job submission to the store complete, by one real `retrac worker`
     process fed through Redis (the embedded runner when Redis is unreachable); the worker is started
     and ready before the clock starts, so its model load counts but its start-up does not.
   Both compute with one thread (as workers do, several to a machine). Rates are sample-slots/s.
2. Scan. An on-disk store of `--rows` (default 50,000) rows, k = `--dim` (4096), float16, filled with
   random rows through `GradientStore.write_shard`, is scanned by `storage` for 1 and 16 queries per
   pass (TracIn and ReTrac both, top 10 and bottom 10), once to load it resident and then timed,
   with `--scan-threads` torch threads (default 1: two processes contending over threaded kernels
   run many times slower, which would measure the machine's neighbours rather than the scan).
   The reference is a plain in-memory torch product over the same float16 array (the faster of a
   direct float16 product and 512-row float32 blocks); `scan_peak_rss_mb` the timed scans' peak RSS.
3. Kernel. The TRAK kernel of that store's checkpoint (`storage.kernels.build_kernel`: a float64
   `Phi^T Phi` over every stored row, its Cholesky factor, written with its digest): `kernel_build_s`,
   `kernel_bytes` on disk, `kernel_precondition_s` (16 query vectors through `F^{-1}`) and the build
   as a multiple of one 16-query scan of the same rows. `--kernel-only` runs this part alone.

Prints one JSON object on stdout (details on stderr); never asserts a timing. Figures: see
docs/performance.md#the-store-indexing-and-scan. Usage: `python bench/store.py [--rows 50000]`
`[--dim 4096] [--index-rows 1024]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, KernelSpec, ProjectorSpec, SlotSpec
from retrac.computers import GradientComputerCache
from retrac.models import build_unet
from retrac.plan import Rows
from retrac.query_side import QueryVectors
from retrac.scoring import scan
from storage import GradientStore, run_pending
from storage.kernels import build_kernel, kernel_bytes, load_kernel
from storage.shards import digest
from storage.store import ROW_ARRAYS

BLOCK = 512
"""Rows per float32 block of the in-memory reference (the design's measured best on this CPU)."""

POLL_SECONDS = 2.0
"""How often the job's completion is checked; the end time is read from the done marks, so polling
rarely (and taking little CPU from the worker) costs no precision."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seconds_of(job: Callable[[], object]) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


# --- 1. indexing ------------------------------------------------------------------------------------------


def index_spec(folder: Path, rows: int) -> IndexSpec:
    checkpoint = folder / "unet"
    build_unet("tiny", resolution=16, channels=1, seed=0).save_pretrained(checkpoint, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")  # found beside the UNet
    return IndexSpec(
        dataset=DatasetSpec(source="builtin:digits", resolution=16, limit=rows),
        checkpoints=(CheckpointSpec(path=str(checkpoint), weight=1.0),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=2, seed=0),
        projector=ProjectorSpec(kind="sketch", dim=4096, seed=0),
        batch_size=32,
        shard_size=256,
    )


def engine_rate(spec: IndexSpec, folder: Path) -> float:
    store = GradientStore.create(folder / "engine.zarr", spec)
    plan, models = store.plan, GradientComputerCache("cpu", threads=1)
    computer = models.computer(plan, 0)
    with models.compute():
        plan.compute_rows(0, slice(0, spec.batch_size), computer)  # warm-up
        start = time.perf_counter()
        for shard in range(store.num_shards):
            plan.compute_rows(0, store.shard_rows(shard), computer)
        seconds = time.perf_counter() - start
    return store.num_rows * store.num_slots / seconds


def index_rate(spec: IndexSpec, folder: Path) -> tuple[float, str]:
    path = folder / "index.zarr"
    store = GradientStore.create(path, spec)
    slots = store.num_rows * store.num_slots
    try:
        from worker import control
        from worker.app import app

        app.control.ping(timeout=1.0)  # raises when the broker is unreachable
    except Exception as error:  # no Redis here: measure the embedded runner instead
        log(f"no broker ({error}); timing the embedded runner")
        start = time.perf_counter()
        run_pending(store, GradientComputerCache("cpu", threads=1))
        return slots / (time.perf_counter() - start), "embedded"
    queue = f"bench-{os.getpid()}"
    hostname = f"bench-{os.getpid()}@localhost"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "worker",
            "--queue",
            queue,
            "--hostname",
            hostname,
            "--loglevel",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not app.control.ping([hostname], timeout=0.5):
            if worker.poll() is not None:
                raise RuntimeError("the benchmark's worker exited")
        start = time.time()
        control.submit(path, queue=queue)
        while not control.progress(path).complete:
            time.sleep(POLL_SECONDS)
        finished = max(float(store.done_marks(0).max()), start)  # the last done mark, not the poll
        return slots / (finished - start), "worker"
    finally:
        worker.kill()
        worker.wait()


# --- 2. scan -----------------------------------------------------------------------------------------------


def scan_store(folder: Path, rows: int, dim: int) -> Path:
    """An on-disk store of `rows` random float16 rows (one slot), written shard by shard."""
    checkpoint = folder / "micro"
    build_unet("micro", resolution=8, channels=1).save_pretrained(checkpoint, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    spec = IndexSpec(
        dataset=DatasetSpec(source="builtin:patches", resolution=8, limit=rows),
        checkpoints=(CheckpointSpec(path=str(checkpoint), weight=1.0),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=1),
        projector=ProjectorSpec(kind="sketch", dim=dim),
        kernel=KernelSpec(),  # built only by `kernel_costs`: the shards are written here, not run
        shard_size=1024,
    )
    store = GradientStore.create(folder / "scan.zarr", spec)
    generator = torch.Generator().manual_seed(0)
    for shard in range(store.num_shards):
        n = store.shard_length(shard)
        projected = torch.randn(n, 1, dim, generator=generator)
        norms = projected.norm(dim=-1) * 3
        slots = torch.zeros(n, 1, dtype=torch.int64)
        store.write_shard(0, shard, Rows(projected, norms, slots, slots))
    return store.path


def random_queries(count: int, dim: int) -> list[QueryVectors]:
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(count, 1, dim, generator=generator)
    return [
        QueryVectors(vectors, timestep_norms=torch.ones(count, 1), bands=torch.zeros(1, dtype=torch.int64))
    ]


def inmemory_products(array: torch.Tensor, count: int) -> list[Callable[[], object]]:
    """The plain products of the float16 `(N, k)` array with `count` query vectors: direct, and
    blocked (512 rows at a time copied into one float32 buffer, then multiplied)."""
    queries = torch.randn(array.shape[1], count)
    direct_queries = queries.half()
    buffer, out = torch.empty(BLOCK, array.shape[1]), torch.empty(array.shape[0], count)

    def direct() -> torch.Tensor:
        return array @ direct_queries

    def blocked() -> torch.Tensor:
        for i in range(0, array.shape[0], BLOCK):
            rows = array[i : i + BLOCK]
            block = buffer[: rows.shape[0]]
            block.copy_(rows)
            torch.mm(block, queries, out=out[i : i + rows.shape[0]])
        return out

    return [direct, blocked]


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scan_rates(path: Path, repeats: int) -> tuple[dict[str, dict[str, float]], float]:
    store = GradientStore.open(path, check=False)
    rows, dim = store.num_rows, store.dim
    cold = seconds_of(lambda: scan(store.chunks([0]), random_queries(1, dim), store.weights, top_k=10))
    log(f"first scan (reading {rows} rows from Zarr into memory): {rows / cold:,.0f} rows/s")
    arrays = [store._array(0, name)[:] for name in ROW_ARRAYS]
    verify = seconds_of(lambda: digest(arrays))  # the check the first scan made, alone
    log(f"digest check: {verify:.3f} s of the first scan's {cold:.3f} s ({verify / cold:.1%})")
    array = torch.from_numpy(store._load_resident(0).projected[:, 0, :])  # the same float16 array, in memory
    results, peak = {}, 0.0
    for count in (1, 16):
        queries = random_queries(count, dim)
        references = inmemory_products(array, count)
        times: list[list[float]] = [[] for _ in range(1 + len(references))]
        for _ in range(repeats):  # interleaved, so that the machine's load drifts over all alike
            reset = reset_peak_rss()  # the high-water mark of this scan alone
            times[0].append(seconds_of(lambda q=queries: scan(store.chunks([0]), q, store.weights, top_k=10)))
            peak = max(peak, peak_rss_mb() if reset else float("nan"))
            for i, product in enumerate(references, start=1):
                times[i].append(seconds_of(product))
        ours = rows / statistics.median(times[0])
        reference = max(rows / statistics.median(t) for t in times[1:])
        results[f"q{count}"] = {"rows_per_s": ours, "ratio_to_inmemory": ours / reference}
        log(f"q{count}: store {ours:,.0f} rows/s, in-memory product {reference:,.0f} rows/s")
    streaming = GradientStore.open(path, check=False, resident_bytes=0)
    seconds = seconds_of(lambda: scan(streaming.chunks([0]), random_queries(1, dim), [1.0], top_k=10))
    log(f"q1 streamed from Zarr (nothing resident): {rows / seconds:,.0f} rows/s")
    results["verify"] = {"seconds": verify, "ratio_to_cold_scan": verify / cold}
    return results, peak


def scan_in_fresh_process(path: Path, args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], float]:
    """`scan_rates` in a new process, so that its peak memory is the scan's, not this process's past."""
    command = [
        sys.executable,
        __file__,
        "--scan-only",
        str(path),
        "--repeats",
        str(args.repeats),
        "--scan-threads",
        str(args.scan_threads),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    measured = json.loads(done.stdout)
    return measured["scan"], measured["scan_peak_rss_mb"]


def kernel_costs(path: Path) -> dict[str, float]:
    """Build time and size of the kernel of the scan store's checkpoint, one query batch's
    preconditioning, and the build against one 16-query scan of the same rows."""
    store = GradientStore.open(path)
    queries = random_queries(16, store.dim)
    list(store.chunks([0]))  # resident, as a serving process holds it, before either clock starts
    build_s = seconds_of(lambda: build_kernel(store, 0))
    kernel = load_kernel(GradientStore.open(path), 0)
    precondition_s = seconds_of(lambda: [v.preconditioned_by(kernel) for v in queries])
    scan_s = seconds_of(lambda: scan(store.chunks([0]), queries, [1.0], top_k=10, methods=["tracin"]))
    return {
        "kernel_build_s": build_s, "kernel_bytes": kernel_bytes(store), "kernel_rows": store.num_rows,
        "kernel_dim": store.dim, "kernel_precondition_s": precondition_s,
        "kernel_build_ratio_to_scan_16": build_s / scan_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the scanned store")
    parser.add_argument("--dim", type=int, default=4096, help="k of the scanned store")
    parser.add_argument("--index-rows", type=int, default=1024, help="samples indexed (digits: at most 1797)")
    parser.add_argument("--repeats", type=int, default=5, help="timed scans per query count")
    parser.add_argument(
        "--scan-threads",
        type=int,
        default=1,
        help="torch threads of both scans (1: robust on a shared machine)",
    )
    parser.add_argument(
        "--scan-only", type=Path, help=argparse.SUPPRESS
    )  # the child of `scan_in_fresh_process`
    parser.add_argument("--kernel-only", action="store_true", help="measure the kernel's costs alone")
    args = parser.parse_args()
    if args.scan_only is not None:
        torch.set_num_threads(args.scan_threads)
        scans, peak = scan_rates(args.scan_only, args.repeats)
        print(json.dumps({"scan": scans, "scan_peak_rss_mb": peak}))
        return
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="retrac-bench-store-"))
    try:
        if args.kernel_only:
            print(json.dumps(kernel_costs(scan_store(folder, args.rows, args.dim))))
            return
        spec = index_spec(folder, args.index_rows)
        before = engine_rate(spec, folder / "before")
        index, mode = index_rate(spec, folder)
        after = engine_rate(spec, folder / "after")
        engine = 2 / (1 / before + 1 / after)  # the same work timed before and after: mean time
        log(f"indexing: engine {before:.1f} before, {after:.1f} after; {mode} {index:.1f} sample-slots/s")
        scanned = scan_store(folder, args.rows, args.dim)
        scans, peak = scan_in_fresh_process(scanned, args)
        result = {
            "index_per_s": index,
            "engine_per_s": engine,
            "index_ratio_to_engine": index / engine,
            "scan": scans,
            "scan_peak_rss_mb": peak,
            **kernel_costs(scanned),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
