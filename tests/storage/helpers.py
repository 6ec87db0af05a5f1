"""Helpers of the store and worker tests: the tiny index spec, and a store's bytes for comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec
from retrac.datasets import load_dataset
from retrac.replay import TrainingRun
from storage import BucketLocation
from tests.conftest import TINY_DATASET, TINY_TRAIN

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


EPOCHS = (2, 4, 6)
"""The epochs `tiny_run` saved checkpoints after."""


def put_inputs(bucket: str, run: TrainingRun, folder: Path) -> None:
    """Put the run's folder under `models/run` and its dataset (48 digits, uint8, with ids) as
    `data/digits.npz` into `bucket`; the dataset file also into `folder/data`."""
    from tests.storage.object_store import upload

    dataset = load_dataset(TINY_DATASET)
    images = np.stack([dataset.to_uint8(i) for i in range(len(dataset))])
    (folder / "data").mkdir(parents=True)
    np.savez(folder / "data" / "digits.npz", images=images, ids=np.array(dataset.ids))
    upload(run.folder, bucket, "models/run")
    upload(folder / "data", bucket, "data")


def inputs_spec(run: str, dataset: str) -> IndexSpec:
    """The index of the tiny run's checkpoints (in `run`: a URL, a folder or a relative path) and the
    `put_inputs` dataset at `dataset`: weights from epoch and lr, 2 grid slots (a run's replay record
    is read from folders only), float32 so that answers match the in-memory engine to rounding."""
    return IndexSpec(
        dataset=DatasetSpec(source=dataset, resolution=8),
        checkpoints=tuple(
            CheckpointSpec(path=f"{run}/checkpoints/epoch-{e:04d}", epoch=e, lr=TINY_TRAIN.lr) for e in EPOCHS
        ),
        scheduler=f"{run}/scheduler",
        loss="mse",
        train_batch_size=TINY_TRAIN.batch_size,
        slots=SlotSpec(replay=False, grid=2, seed=1),
        projector=ProjectorSpec(kind="sketch", dim=256, seed=3),
        dtype="float32",
        batch_size=8,
        shard_size=8,
    )


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
