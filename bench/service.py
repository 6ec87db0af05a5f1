"""Benchmark: attribution queries through the service, for the "tiny" and "small" UNets.

For each preset, a one-checkpoint model is trained for an epoch on built-in data and indexed (k =
4096, float16); the same query (K = 50, M = 4, one image) is sent through the ASGI app several times
and the fastest answer's own timing split is reported: gradient_s (the query-side gradients, K*M
noised copies at every checkpoint), scan_s (the pass over the stored rows) and
gradient_ratio_to_plain (gradient_s over one plain batched forward+backward of the same K*M samples,
per checkpoint, the two timed alternately; target <= 1.3).

Then `retrac serve` serves the tiny index through uvicorn on loopback, in each of `SERVERS` (server
processes x torch threads each, and the processes of a query pool computing their query gradients,
`--query-pool`), and 8 concurrent clients send `REQUESTS` queries (each client's next after its last
answer): `concurrency` lists the throughput and the p50/p99 latency of each, and
requests_per_s_8_clients is the 2-process (no pool) one's throughput.

Then `retrac serve` (one process) serves the small index (R = 32, RGB) at the default limits and 16
clients at once send each kind of worst-case upload (upload_memory): the largest images accepted
(`max_images` RGBA PNGs of side 16 R, which are decoded and queried), decompression-bomb PNGs (4096 x
4096 zeros, 49 KB each, refused from their header) and bodies at the size limit. The server's peak
RSS is read from /proc (VmHWM, reset before each kind) and set against its RSS before, and against
the per-request bound docs/deployment.md states.

Prints one JSON object on stdout; never asserts a timing. Figures: see docs/performance.md#the-service.
Usage: `python bench/service.py [--threads 2] [--parts latency throughput memory]
[--servers 1x1x0 1x1x2 ...]` (throughput rows as processes x threads x pool).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file's name would shadow the
# `service` package: take the folder off before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from api_schemas import DatasetSpec, IndexSpec, SlotSpec, TrainSpec  # noqa: E402
from retrac.computers import GradientComputerCache  # noqa: E402
from retrac.datasets import MAX_IMAGE_SIDE, load_dataset  # noqa: E402
from retrac.losses import distance, noised  # noqa: E402
from retrac.training import train  # noqa: E402
from service.images import max_side  # noqa: E402
from service.main import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from storage import GradientStore, run_pending  # noqa: E402

QUERY = {"timesteps": 50, "draws": 4, "top_k": 10, "seed": 0}
PRESETS = {
    # preset: (dataset, training samples)
    "tiny": (DatasetSpec(source="builtin:digits", resolution=16, channels=1), 512),
    "small": (DatasetSpec(source="builtin:patches", resolution=32, channels=3), 96),
}
CLIENTS = 8
REQUESTS = 32
SERVERS = ((1, 1, 0), (1, 2, 0), (2, 1, 0), (4, 1, 0), (1, 1, 1), (1, 1, 2), (1, 2, 1))
"""(uvicorn worker processes, torch threads each, query pool processes each: 0 for none) of the
concurrency part; a pool's processes have the same torch threads."""
PARTS = ("latency", "throughput", "memory")
NEEDS = {"latency": ("tiny", "small"), "throughput": ("tiny",), "memory": ("small",)}
"""The indexes each part queries."""
UPLOADERS = 16
"""Concurrent worst-case uploads of the memory part."""
UPLOAD_QUERY = {"timesteps": 1, "draws": 1, "top_k": 1, "seed": 0}
"""The cheapest query: the memory part measures what uploads cost, not query gradients."""


def build_index(preset: str, root: Path, threads: int) -> GradientStore:
    """Train `preset` for one epoch (one checkpoint) and index it with the default sketch."""
    shape, count = PRESETS[preset]
    dataset_spec = shape.model_copy(update={"limit": count})
    run = train(
        TrainSpec(dataset=dataset_spec, preset=preset, epochs=1, save_every=1, batch_size=32),
        load_dataset(dataset_spec),
        root / "models" / preset,
    )
    spec = IndexSpec(dataset=dataset_spec, run=str(run.folder), slots=SlotSpec(replay=True))
    store = GradientStore.create(root / "stores" / preset, spec)
    run_pending(store, GradientComputerCache("cpu", threads=threads))
    return store


def query_png(store: GradientStore) -> bytes:
    out = io.BytesIO()
    Image.fromarray(store.plan.dataset.to_uint8(0)).save(out, format="PNG")
    return out.getvalue()


def plain_pass(store: GradientStore, samples: int) -> Callable[[], None]:
    """One plain batched forward+backward of the mean loss over `samples` noised copies of an image."""
    model = store.plan.load_model(0)
    image = store.plan.dataset.images[:1].expand(samples, -1, -1, -1)
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, model.num_timesteps, (samples,), generator=generator)
    noise = torch.randn(image.shape, generator=generator)
    weights = [p for p in model.unet.parameters() if p.requires_grad]

    def run() -> None:
        x_t = noised(image, timesteps, noise, model.scheduler)
        value = distance(model.unet(x_t, timesteps).sample, noise, store.plan.loss).mean()
        torch.autograd.grad(value, weights)

    return run


def bench_latency(store: GradientStore, settings: Settings, repeats: int) -> dict[str, float]:
    """Fastest query split and fastest plain pass, timed alternately so machine noise hits both alike
    (after one query that loads the model)."""
    client = TestClient(create_app(settings))
    url = f"/v1/indexes/{store.path.name}/attribute/upload"
    files = {"images": ("query.png", query_png(store), "image/png")}
    plain = plain_pass(store, QUERY["timesteps"] * QUERY["draws"])
    timings, plain_s = [], []
    for repeat in range(repeats + 1):
        response = client.post(url, files=files, data=QUERY)
        response.raise_for_status()
        started = time.perf_counter()
        plain()
        if repeat:
            timings.append(response.json()["timings"])
            plain_s.append(time.perf_counter() - started)
    best = min(timings, key=lambda t: t["gradient_s"] + t["scan_s"])
    return {
        "gradient_s": best["gradient_s"],
        "scan_s": best["scan_s"],
        "gradient_ratio_to_plain": min(t["gradient_s"] for t in timings)
        / (min(plain_s) * store.num_checkpoints),
    }


async def bench_throughput(url: str, name: str, image: bytes) -> dict[str, float]:
    """Requests per second, p50 and p99 latency of `REQUESTS` queries sent by `CLIENTS` concurrent
    clients, after one round that warms every server process."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def send(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                response = await client.post(
                    f"/v1/indexes/{name}/attribute/upload",
                    data=QUERY,
                    files={"images": ("query.png", image, "image/png")},
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(send(1) for _ in range(CLIENTS)))  # warm every server process
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(send(REQUESTS // CLIENTS) for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - started
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"requests_per_s": len(latencies) / elapsed, "p50_s": float(p50), "p99_s": float(p99)}


def bench_concurrency(
    root: Path, port: int, servers: Sequence[tuple[int, int, int]] = SERVERS
) -> list[dict[str, float]]:
    """`bench_throughput` against the tiny index for each of `servers`, in their order."""
    image = query_png(GradientStore.open(root / "stores" / "tiny"))
    report = []
    for processes, threads, pool in servers:
        server = serve(root, port, processes, threads, pool)
        try:
            measured = asyncio.run(bench_throughput(f"http://127.0.0.1:{port}", "tiny", image))
        finally:
            server.terminate()
            server.wait()
        report.append(
            {
                "processes": processes, "torch_threads": threads, "query_pool": pool, "clients": CLIENTS,
                **measured,
            }
        )
        print(f"concurrency: {report[-1]}", file=sys.stderr, flush=True)
    return report


def png_file(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def worst_case_uploads(
    resolution: int, settings: Settings
) -> dict[str, tuple[list[tuple[str, bytes]], dict[str, object], int]]:
    """Per kind: the files of one request, its query fields, and the status it must get.

    `largest_images` asks for a checkpoint the index lacks, which is refused after every image is
    decoded but before any gradient: what the upload costs. `largest_images_queried` runs the query
    too (one at a time, behind the engine's lock)."""
    side = max_side(resolution)
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    rows, columns = np.broadcast_arrays(ramp[:, None], ramp[None, :])
    largest = png_file(np.stack([rows, columns, rows, columns], -1))  # RGBA, smooth: a small file
    bomb = png_file(np.zeros((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), np.uint8))
    filler = np.random.default_rng(0).bytes(settings.max_upload_bytes - (64 << 10))  # room for the form
    largest_images = [(f"{i}.png", largest) for i in range(settings.max_images)]
    return {
        "largest_images": (largest_images, {**UPLOAD_QUERY, "checkpoints": [99]}, 422),
        "largest_images_queried": (largest_images, UPLOAD_QUERY, 200),
        "bomb_pngs": ([(f"{i}.png", bomb) for i in range(settings.max_images)], UPLOAD_QUERY, 422),
        "max_body": ([("filler.png", filler)], UPLOAD_QUERY, 422),
    }


def rss_kb(pid: int, field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of process `pid`, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


async def upload_peak(
    url: str,
    name: str,
    pid: int,
    warm_up: bytes,
    files: list[tuple[str, bytes]],
    fields: dict[str, object],
    status: int,
) -> tuple[int, int]:
    """(RSS after one small query, peak RSS while `UPLOADERS` clients send `files` with `fields` at
    once), in kB, of the server process `pid`."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def send(files: list[tuple[str, bytes]], fields: dict[str, object], status: int) -> None:
            response = await client.post(
                f"/v1/indexes/{name}/attribute/upload",
                data=fields,
                files=[("images", (file_name, data, "image/png")) for file_name, data in files],
            )
            if response.status_code != status:
                raise RuntimeError(f"expected {status}, got {response.status_code}: {response.text[:300]}")

        await send([("warm-up.png", warm_up)], UPLOAD_QUERY, 200)  # the model and the store are loaded
        baseline = rss_kb(pid, "VmRSS")
        reset_peak(pid)
        await asyncio.gather(*(send(files, fields, status) for _ in range(UPLOADERS)))
        return baseline, rss_kb(pid, "VmHWM")


def bench_upload_memory(root: Path, port: int, store: GradientStore, settings: Settings) -> dict[str, object]:
    """Per worst-case kind, on a fresh server process each (memory a kind leaves allocated would
    otherwise count against the next): its RSS before and its peak under `UPLOADERS` such uploads."""
    resolution = store.spec.dataset.resolution
    report: dict[str, dict[str, float]] = {}
    for kind, (files, fields, status) in worst_case_uploads(resolution, settings).items():
        server = serve(root, port, 1, 1)
        try:
            url = f"http://127.0.0.1:{port}"
            baseline, peak = asyncio.run(
                upload_peak(url, store.path.name, server.pid, query_png(store), files, fields, status)
            )
        finally:
            server.terminate()
            server.wait()
        report[kind] = {
            "baseline_rss_mb": baseline / 1024,
            "peak_rss_mb": peak / 1024,
            "added_mb_per_request": (peak - baseline) / 1024 / UPLOADERS,
        }
    side = max_side(resolution)
    bound = settings.max_upload_bytes + settings.max_images * side * side * 16
    return {
        "resolution": resolution,
        "concurrent_requests": UPLOADERS,
        **report,
        "stated_bound_mb_per_request": bound / (1 << 20),
    }


def serve(root: Path, port: int, processes: int, threads: int, pool: int = 0) -> subprocess.Popen[bytes]:
    """`retrac serve --workers processes --query-pool pool` with `threads` torch threads each, once it
    answers."""
    env = {
        **os.environ,
        "RETRAC_STORES_ROOT": str(root / "stores"),
        "RETRAC_MODELS_ROOT": str(root / "models"),
        "RETRAC_TORCH_THREADS": str(threads),
    }
    command = [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(processes),
        "--query-pool",
        str(pool),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("retrac serve did not start")


def server_setup(text: str) -> tuple[int, int, int]:
    """`PxTxN` (processes, torch threads, query pool) as a tuple: a `--servers` item."""
    try:
        processes, threads, pool = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give processes x threads x pool, e.g. 1x1x2") from None
    return processes, threads, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the queries (and server processes)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed queries per preset")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument(
        "--servers",
        nargs="+",
        type=server_setup,
        default=list(SERVERS),
        metavar="PxTxN",
        help="throughput servers as processes x torch threads x query pool, e.g. 1x1x2 (default: SERVERS)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, object] = {}
    presets = [p for p in PRESETS if any(p in NEEDS[part] for part in args.parts)]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = Settings(
            stores_root=root / "stores", models_root=root / "models", torch_threads=args.threads
        )
        for preset in presets:
            store = build_index(preset, root, args.threads)
            if "latency" in args.parts:
                report[preset] = bench_latency(store, settings, args.repeats)
        if "throughput" in args.parts:
            report["concurrency"] = bench_concurrency(root, args.port, args.servers)
            report["requests_per_s_8_clients"] = next(
                (
                    c["requests_per_s"] for c in report["concurrency"]
                    if c["processes"] == 2 and not c["query_pool"]
                ),
                None,
            )
        if "memory" in args.parts:
            store = GradientStore.open(root / "stores" / "small")
            report["upload_memory"] = bench_upload_memory(root, args.port, store, settings)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
