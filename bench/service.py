"""Benchmark: attribution queries through the service, for the "tiny" and "small" UNets.

For each preset, a one-checkpoint model is trained for an epoch on built-in data and indexed with the
default count sketch (k = 4096, float16); then the same query (K = 50, M = 4, one image) is sent
through the ASGI app several times and the fastest answer's own timing split is reported:

- gradient_s: the query-side gradients (K*M noised copies of the image, at every checkpoint);
- scan_s: the pass over the stored rows;
- gradient_ratio_to_plain: gradient_s over one plain batched forward+backward of the same K*M
  samples on the same model and thread count (per checkpoint), the two timed alternately; target
  <= 1.3.

Then `retrac serve --workers 2` serves the tiny index on loopback and 8 concurrent clients send
queries: requests_per_s_8_clients. Prints one JSON object on stdout; never asserts a timing.
Usage: `python bench/service.py [--threads 2]`.
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
from collections.abc import Callable  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from api_schemas import DatasetSpec, IndexSpec, SlotSpec, TrainSpec  # noqa: E402
from retrac.datasets import load_dataset  # noqa: E402
from retrac.losses import distance, noised  # noqa: E402
from retrac.training import train  # noqa: E402
from service.main import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from retrac.computers import GradientComputerCache  # noqa: E402
from storage import GradientStore, run_pending  # noqa: E402

QUERY = {"timesteps": 50, "draws": 4, "top_k": 10, "seed": 0}
PRESETS = {
    # preset: (dataset, training samples)
    "tiny": (DatasetSpec(source="builtin:digits", resolution=16, channels=1), 512),
    "small": (DatasetSpec(source="builtin:patches", resolution=32, channels=3), 96),
}
CLIENTS = 8
REQUESTS = 24


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


async def bench_throughput(url: str, name: str, image: bytes) -> float:
    """Requests per second of `REQUESTS` queries sent by `CLIENTS` concurrent clients."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def send(count: int) -> None:
            for _ in range(count):
                response = await client.post(
                    f"/v1/indexes/{name}/attribute/upload",
                    data=QUERY,
                    files={"images": ("query.png", image, "image/png")},
                )
                response.raise_for_status()

        await asyncio.gather(*(send(1) for _ in range(CLIENTS)))  # warm every server process
        started = time.perf_counter()
        await asyncio.gather(*(send(REQUESTS // CLIENTS) for _ in range(CLIENTS)))
        return REQUESTS / (time.perf_counter() - started)


def serve(root: Path, port: int, threads: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RETRAC_STORES_ROOT": str(root / "stores"),
        "RETRAC_MODELS_ROOT": str(root / "models"),
        "RETRAC_TORCH_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(threads),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the queries (and server processes)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed queries per preset")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = Settings(
            stores_root=root / "stores", models_root=root / "models", torch_threads=args.threads
        )
        for preset in PRESETS:
            store = build_index(preset, root, args.threads)
            report[preset] = bench_latency(store, settings, args.repeats)
        server = serve(root, args.port, args.threads)
        try:
            image = query_png(GradientStore.open(root / "stores" / "tiny"))
            report["requests_per_s_8_clients"] = asyncio.run(
                bench_throughput(f"http://127.0.0.1:{args.port}", "tiny", image)
            )
        finally:
            server.terminate()
            server.wait()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
