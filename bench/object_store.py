"""Benchmark: a store in an S3-compatible bucket against the same store in a local folder.

1. Indexing. The embedded runner fills one index (the "tiny" UNet at 16x16x1, `--index-rows` digits,
   2 grid slots, a k=4096 count sketch, shards of 64 rows) into a local folder, then into a bucket,
   then into a local folder again (the machine's load drifts; local is the mean of the two).
   `index_ratio_to_local` is the bucket's rate over the local one: what the object store costs a
   worker, whose compute is the same.
2. Scan. A store of `--rows` random float16 rows at k = `--dim`, written into a local folder and
   copied object by object into the bucket (the same bytes), is scanned for one query streamed
   chunk by chunk (nothing resident, every chunk's digest checked), alternately from each, `--repeats`
   times. `scan_ratio_to_local` is the bucket's median rate over the local one; `load_ratio_to_local`
   compares the first read that makes an index resident; `scan.scan_ratio_to_plain_get` compares the
   streamed scan with fetching every object of the store by plain concurrent GETs (the server's own
   limit, without zarr or retrac).

The S3 server is moto's (PyPI `moto[server]`), on loopback: a Python server, far slower per request
than S3 or MinIO, so the ratios here are a lower bound of what a real object store gives.
`object_store_ratios()` returns the two ratios for `bench/scale.py`; run as a script, prints one JSON
object (details on stderr); never asserts a timing. Usage:
`python bench/object_store.py [--index-rows 256] [--rows 16384] [--dim 1024] [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import torch
from diffusers import DDPMScheduler

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec
from retrac.computers import GradientComputerCache
from retrac.models import build_unet
from retrac.scoring import scan
from storage import GradientStore, Location, locate, run_pending

sys.path.insert(0, str(Path(__file__).parent))
from store import log, random_queries, scan_store, seconds_of  # noqa: E402  (bench/store.py, beside this file)

GET_THREADS = 8
"""Concurrent plain GETs of the reference read (zarr too fetches a read's chunks concurrently)."""
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "retrac-bench", "AWS_SECRET_ACCESS_KEY": "retrac-bench-secret"}


@contextmanager
def s3_bucket() -> Iterator[str]:
    """moto's S3 server on a free loopback port, this process's AWS variables pointed at it, and a
    new bucket there; yields the bucket's name."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        name = f"retrac-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        yield name
    finally:
        server.kill()
        server.wait()


def model_folder(folder: Path, preset: str, resolution: int) -> Path:
    """A UNet of `preset` saved with a scheduler beside it (a store never guesses a schedule)."""
    checkpoint = folder / preset
    build_unet(preset, resolution=resolution, channels=1, seed=0).save_pretrained(
        checkpoint, safe_serialization=True
    )
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return checkpoint


# --- 1. indexing ------------------------------------------------------------------------------------------


def index_ratio(folder: Path, bucket: str, rows: int) -> dict[str, float]:
    spec = IndexSpec(
        dataset=DatasetSpec(source="builtin:digits", resolution=16, limit=rows),
        checkpoints=(CheckpointSpec(path=str(model_folder(folder, "tiny", 16)), weight=1.0),),
        loss="mse",
        slots=SlotSpec(replay=False, grid=2, seed=0),
        projector=ProjectorSpec(kind="sketch", dim=4096, seed=0),
        batch_size=32,
        shard_size=64,
    )
    models = GradientComputerCache("cpu", threads=1)  # loaded once: every run computes alike

    def fill(where: str | Path) -> float:
        store = GradientStore.create(locate(where), spec)
        return store.num_rows * store.num_slots / seconds_of(lambda: run_pending(store, models))

    fill(folder / "warm-up.zarr")
    before = fill(folder / "a.zarr")
    remote = fill(f"s3://{bucket}/index.zarr")
    after = fill(folder / "b.zarr")
    local = 2 / (1 / before + 1 / after)
    log(f"indexing: local {before:.0f} and {after:.0f}, bucket {remote:.0f} sample-slots/s")
    return {"local_per_s": local, "bucket_per_s": remote, "ratio": remote / local}


# --- 2. scan -----------------------------------------------------------------------------------------------


def copied(store: GradientStore, target: Location) -> GradientStore:
    """The local `store`'s files put, object by object, under `target`: the same bytes there."""
    for key in store.location.sizes():
        target.write(key, store.location.read(key) or b"")
    return GradientStore.open(target, check=False)


def get_all(location: Location) -> None:
    """Every object of the store fetched once, concurrently, without zarr or retrac: the server's rate."""
    keys = list(location.sizes())
    with ThreadPoolExecutor(GET_THREADS) as pool:
        list(pool.map(location.read, keys))


def scan_ratio(folder: Path, bucket: str, rows: int, dim: int, repeats: int) -> dict[str, float]:
    local = GradientStore.open(scan_store(folder, rows, dim))
    remote = copied(local, locate(f"s3://{bucket}/scan.zarr"))
    queries = random_queries(1, dim)

    def rate(store: GradientStore, resident: bool) -> float:
        opened = GradientStore.open(store.location, check=False, resident_bytes=(2 << 30) if resident else 0)
        return rows / seconds_of(lambda: scan(opened.chunks([0]), queries, [1.0], top_k=10))

    rates: dict[str, list[float]] = {
        "local": [], "bucket": [], "local_load": [], "bucket_load": [], "bucket_get": []
    }
    for _ in range(repeats):  # interleaved, so that the machine's load drifts over both alike
        for name, store in (("local", local), ("bucket", remote)):
            rates[name].append(rate(store, resident=False))
            rates[f"{name}_load"].append(rate(store, resident=True))  # the first, resident-making read
        rates["bucket_get"].append(rows / seconds_of(lambda: get_all(remote.location)))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    log(", ".join(f"{name} {value:,.0f} rows/s" for name, value in medians.items()))
    return {
        **{f"{name}_rows_per_s": value for name, value in medians.items()},
        "ratio": medians["bucket"] / medians["local"],
        "load_ratio": medians["bucket_load"] / medians["local_load"],
        "scan_ratio_to_plain_get": medians["bucket"] / medians["bucket_get"],
    }


def object_store_ratios(
    index_rows: int = 256, rows: int = 16384, dim: int = 1024, repeats: int = 5
) -> dict[str, Any]:
    """`{"index_ratio_to_local": a, "scan_ratio_to_local": b, ...}`: a store in a bucket (moto's
    server on loopback) against the same store in a local folder, measured in one run."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="retrac-bench-s3-") as scratch, s3_bucket() as bucket:
        folder = Path(scratch)
        index = index_ratio(folder / "index", bucket, index_rows)
        scans = scan_ratio(folder / "scan", bucket, rows, dim, repeats)
    return {
        "index_ratio_to_local": index["ratio"],
        "scan_ratio_to_local": scans["ratio"],
        "load_ratio_to_local": scans["load_ratio"],
        "index": index,
        "scan": scans,
        "server": "moto (loopback)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index-rows", type=int, default=256, help="samples indexed (digits: at most 1797)")
    parser.add_argument("--rows", type=int, default=16384, help="rows of the scanned store")
    parser.add_argument("--dim", type=int, default=1024, help="k of the scanned store")
    parser.add_argument("--repeats", type=int, default=5, help="timed scans from each store")
    args = parser.parse_args()
    print(json.dumps(object_store_ratios(args.index_rows, args.rows, args.dim, args.repeats)))


if __name__ == "__main__":
    main()
