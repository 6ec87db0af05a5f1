"""Damaged bytes are never scored: every read that scores checks each shard against its done mark's
digest, a damaged store is refused naming the shard, and `index status --verify` plus `index run`
recompute exactly the damaged shards."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cli import main
from storage import DamagedStoreError, GradientStore
from tests.storage.helpers import data_files, store_bytes

CHECKPOINT, SHARD = 1, 3
"""The shard every test damages."""


def flip_sign_bits(path: Path) -> None:
    """Flip the sign of every float16 gradient of the projected chunk: same size, other values."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint16) ^ np.uint16(0x8000)
    path.write_bytes(data.tobytes())


def nan_bytes(path: Path) -> None:
    """Overwrite the first row's projected gradients with float16 NaNs."""
    data = np.frombuffer(path.read_bytes(), dtype=np.float16).copy()
    data[:256] = np.nan
    path.write_bytes(data.tobytes())


def zero_norms(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


DAMAGES: dict[str, tuple[int, Callable[[Path], None]]] = {
    "flipped sign bits": (0, flip_sign_bits),
    "NaN bytes": (0, nan_bytes),
    "zeroed norms": (1, zero_norms),
}
"""Each damage: which per-row array of `data_files` it hits, and how."""


@pytest.fixture(params=list(DAMAGES))
def damaged(request: pytest.FixtureRequest, tmp_path: Path, reference_store: Path) -> Path:
    """A copy of the filled reference store with checkpoint 1, shard 3 damaged in place."""
    shutil.copytree(reference_store, tmp_path / "index.zarr")
    which, damage = DAMAGES[request.param]
    file = data_files(tmp_path / "index.zarr", CHECKPOINT, SHARD)[which]
    size = file.stat().st_size
    damage(file)
    assert file.stat().st_size == size  # the cheap size check cannot see it
    return tmp_path / "index.zarr"


@pytest.mark.parametrize("resident_bytes", [2 << 30, 0], ids=["resident", "streamed"])
def test_a_damaged_shard_is_refused_naming_it(damaged: Path, resident_bytes: int) -> None:
    store = GradientStore.open(damaged, resident_bytes=resident_bytes)
    assert store.status().complete  # the marks alone say done
    with pytest.raises(DamagedStoreError, match=f"checkpoint {CHECKPOINT} shard {SHARD} ") as error:
        for _ in store.chunks([0, 1, 2], rows_per_chunk=8):
            pass
    assert "`retrac index status --verify STORE` then `retrac index run STORE`" in str(error.value)
    assert str(damaged.parent) not in str(error.value)  # no server path in the message
    list(store.chunks([0, 2]))  # the undamaged checkpoints still scan


def test_verify_marks_the_damaged_shard_and_run_recomputes_exactly_it(
    damaged: Path, reference_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "status", "--verify", str(damaged)]) == 0
    assert "checkpoint 1 (epoch 4): 5/6 shards, 40/48 rows" in capsys.readouterr().out
    assert GradientStore.open(damaged).pending() == [(CHECKPOINT, SHARD)]  # marked not done, for good
    assert main(["index", "run", str(damaged)]) == 0
    assert "1 shards computed; complete: True" in capsys.readouterr().out
    assert store_bytes(damaged) == store_bytes(reference_store)
    list(GradientStore.open(damaged).chunks([0, 1, 2]))
