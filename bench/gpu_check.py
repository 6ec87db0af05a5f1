"""GPU check: one small store built on `--device` and on the CPU, compared; a query on both; rows/s.

Trains the micro model on 48 digits at 8 px (as the tests' run), creates one store spec twice
(replay + 2 grid slots, k = 256 sketch, float16) and fills one on `--device`, one on the CPU. Prints
one JSON object: indexing rows/s on each, the largest normwise relative difference of the stored rows
and of the norms (tests/gpu asserts them within tests/tolerances.py's derived bounds), and the top-10
overlap of one query answered on each. `--device cpu` is a dry run of the same steps. Part of
`scripts/gpu_check.sh`; figures: docs/performance.md#memory-budgets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from api_schemas import DatasetSpec, ProjectorSpec, QuerySpec, SlotSpec, TrainSpec
from api_schemas.specs import IndexSpec
from retrac.computers import GradientComputerCache
from retrac.datasets import load_dataset
from retrac.training import train
from storage import GradientStore, attribute, run_pending

DATASET = DatasetSpec(source="builtin:digits", resolution=8, limit=48)
QUERY = QuerySpec(timesteps=6, draws=2, seed=4)
TOP_K = 10


def fill(folder: Path, spec: IndexSpec, device: str) -> tuple[GradientStore, float]:
    """The store of `spec` filled on `device`, and its indexing rate in rows/s (wall clock)."""
    store = GradientStore.create(folder / f"{device}.zarr", spec)
    models = GradientComputerCache(device, threads=1)
    started = time.perf_counter()
    run_pending(store, models)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return store, store.num_rows * store.num_checkpoints / (time.perf_counter() - started)


def rows(store: GradientStore, checkpoint: int) -> np.ndarray:
    group = zarr.open_group(store.path, mode="r")
    return np.asarray(group[f"checkpoints/{checkpoint}/projected"][:], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    spec = TrainSpec(dataset=DATASET, preset="micro", epochs=6, batch_size=16, lr=2e-3, save_every=2)
    run = train(spec, load_dataset(DATASET), folder / "run")
    index = IndexSpec(
        dataset=DATASET, run=str(run.folder), slots=SlotSpec(replay=True, grid=2, seed=1),
        projector=ProjectorSpec(kind="sketch", dim=256, seed=3), batch_size=8, shard_size=16,
    )
    device_store, device_rate = fill(folder, index, args.device)
    cpu_store, cpu_rate = fill(folder, index, "cpu") if args.device != "cpu" else (device_store, device_rate)
    row_error = norm_error = 0.0
    for c in range(cpu_store.num_checkpoints):
        want, got = rows(cpu_store, c), rows(device_store, c)
        difference = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        row_error = max(row_error, float(difference.max()))
        norms = cpu_store.norms(c)
        norm_error = max(norm_error, float((np.abs(device_store.norms(c) - norms) / norms).max()))
    images = cpu_store.plan.dataset.images[[3, 17]]
    answers = [
        attribute(store, images, QUERY, top_k=TOP_K, models=GradientComputerCache(device, threads=1))
        for store, device in ((device_store, args.device), (cpu_store, "cpu"))
    ]
    tops = [[{i.sample_id for i in r.methods["tracin"].proponents} for r in a.results] for a in answers]
    overlap = [len(a & b) / TOP_K for a, b in zip(*tops, strict=True)]
    print(json.dumps({
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "index_rows_per_s": round(device_rate, 1),
        "cpu_index_rows_per_s": round(cpu_rate, 1),
        "row_relative_difference": row_error,
        "norm_relative_difference": norm_error,
        "query_top10_overlap": overlap,
    }))


if __name__ == "__main__":
    main()
