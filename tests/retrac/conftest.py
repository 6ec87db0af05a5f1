"""Fixtures of the engine tests: a tiny trained run with replay, and its exact in-memory index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from api_schemas import DatasetSpec, IndexSpec, ProjectorSpec, SlotSpec, TrainSpec
from retrac.datasets import ImageDataset, load_dataset
from retrac.replay import TrainingRun
from retrac.training import train

torch.set_num_threads(1)

DIGITS = DatasetSpec(source="builtin:digits", resolution=8, limit=30)


@pytest.fixture(scope="session")
def digits() -> ImageDataset:
    return load_dataset(DIGITS)


@pytest.fixture(scope="session")
def replay_run(tmp_path_factory: pytest.TempPathFactory, digits: ImageDataset) -> TrainingRun:
    """A micro DDPM trained 4 epochs on 30 digits, batch 8 (a smaller last batch), checkpoints at 2 and 4."""
    spec = TrainSpec(
        dataset=DIGITS, preset="micro", loss="l1", epochs=4, batch_size=8, lr=2e-3, save_every=2, seed=3
    )
    return train(spec, digits, tmp_path_factory.mktemp("run"))


def index_spec(run: TrainingRun, *, kind: str = "identity", dim: int = 4096, grid: int = 0) -> IndexSpec:
    return IndexSpec(
        dataset=DIGITS,
        run=str(run.folder),
        slots=SlotSpec(replay=True, grid=grid, seed=1),
        projector=ProjectorSpec(kind=kind, dim=dim, seed=5),
        shard_size=16,
    )


@pytest.fixture
def tmp_run_copy(tmp_path: Path, replay_run: TrainingRun) -> Path:
    """A copy of the run folder that a test may damage."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(replay_run.folder, target)
    return target
