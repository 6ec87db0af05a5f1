"""Helpers of the store and worker tests: the tiny index spec, and a store's bytes for comparisons."""

from __future__ import annotations

import json
from pathlib import Path

from api_schemas import IndexSpec, ProjectorSpec, SlotSpec
from retrac.replay import TrainingRun
from storage import BucketLocation
from tests.conftest import TINY_DATASET

SHARD_SIZE = 8
"""48 samples in shards of 8: 6 shards per checkpoint, 18 tasks over the 3 checkpoints of `tiny_run`."""


def tiny_index_spec(run: TrainingRun | Path, **changes: object) -> IndexSpec:
    """Replay plus 2 grid slots, a k=256 count sketch, float16: small, but every feature in use."""
    folder = run.folder if isinstance(run, TrainingRun) else run
    fields = dict(
        dataset=TINY_DATASET,
        run=str(folder),
        slots=SlotSpec(replay=True, grid=2, seed=1),
        projector=ProjectorSpec(kind="sketch", dim=256, seed=3),
        batch_size=8,
        shard_size=SHARD_SIZE,
    )
    return IndexSpec(**{**fields, **changes})


def store_bytes(path: Path | BucketLocation) -> dict[str, bytes]:
    """Every file (or object, for a store in a bucket) of a store except the done-mark times, the
    store's uid (which differ between runs) and the ANN index (its manifest holds a digest of the uid),
    keyed by path relative to the store."""
    from tests.storage.object_store import files as local_files
    from tests.storage.object_store import objects

    every = objects(path) if isinstance(path, BucketLocation) else local_files(path)
    files = {
        key: data
        for key, data in sorted(every.items())
        if not ("done_at" in key.split("/") and not key.endswith("/zarr.json")) and key.split("/")[0] != "ann"
    }
    root = json.loads(files["zarr.json"])
    root["attributes"].pop("uid")
    files["zarr.json"] = json.dumps(root).encode()
    return files


def data_files(path: Path, checkpoint: int, shard: int) -> list[Path]:
    """The chunk files of one shard's per-row arrays."""
    base = path / "checkpoints" / str(checkpoint)
    return [
        base / "projected/c" / str(shard) / "0/0",
        base / "norms/c" / str(shard) / "0",
        base / "timesteps/c" / str(shard) / "0",
        base / "seeds/c" / str(shard) / "0",
    ]
