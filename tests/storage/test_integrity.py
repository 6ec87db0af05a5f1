"""Damaged bytes are never scored: every read checks each shard against its done mark's digest (bound
to the shard's checkpoint and place), a damaged store is refused naming the shard, and `index status
--verify` plus `index run` recompute exactly the damaged shards.

The damage table hits every array of a store (each per-row array, digests, done marks, sample ids, the
ANN files, checkpoints and shards swapped), cold (damaged before the store is opened) and resident
(damaged after every read was served once, so from memory): each read is refused or answers exactly
what the undamaged store answers, and the reads of the damaged data are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from cli import main
from retrac.scoring import METHODS
from storage import AnnIndexError, DamagedStoreError, GradientStore, IncompleteStoreError, StoreError
from storage.ann import build_ann, load_ann
from tests.storage.helpers import data_files, store_bytes

CHECKPOINT, SHARD = 1, 3
"""The shard the row damages hit (rows 24..31 of checkpoint 1)."""
ROWS = np.array([5, 27, 40])
"""Rows that `timesteps_of` and `rows_at` read: one of them in the damaged shard."""


def flip_sign_bits(path: Path) -> None:
    """Flip the sign of every float16 gradient of the projected chunk: same size, other values."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint16) ^ np.uint16(0x8000)
    path.write_bytes(data.tobytes())


def nan_bytes(path: Path) -> None:
    """Overwrite the first row's projected gradients with float16 NaNs."""
    data = np.frombuffer(path.read_bytes(), dtype=np.float16).copy()
    data[:256] = np.nan
    path.write_bytes(data.tobytes())


def zero_bytes(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def add_one(path: Path) -> None:
    """Add 1 to the first int64 (a timestep or a seed): a plausible value, not the stored one."""
    data = np.frombuffer(path.read_bytes(), dtype=np.int64).copy()
    data[0] += 1
    path.write_bytes(data.tobytes())


def in_row_file(which: int, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage the chunk file of per-row array `which` (`data_files` order) of the damaged shard."""
    return lambda store: damage(data_files(store, CHECKPOINT, SHARD)[which])


def in_shard_file(name: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage the damaged shard's chunk of the per-shard array `name` (digest, done_at)."""
    return lambda store: damage(store / f"checkpoints/{CHECKPOINT}/{name}/c/{SHARD}")


def flip_first_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


def swap(first: Path, second: Path) -> None:
    aside = first.with_name(f".{first.name}.aside")
    os.rename(first, aside)
    os.rename(second, first)
    os.rename(aside, second)


def swap_checkpoints(store: Path) -> None:
    """Swap the groups of checkpoints 0 and 1, each consistent with its own done marks and digests."""
    swap(store / "checkpoints/0", store / "checkpoints/1")


def swap_shards(store: Path) -> None:
    """Swap shards 2 and 3 of checkpoint 1 in every array, data, digests and done marks alike."""
    for name in (
        "projected/c/{}/0/0",
        "norms/c/{}/0",
        "timesteps/c/{}/0",
        "seeds/c/{}/0",
        "digest/c/{}",
        "done_at/c/{}",
    ):
        base = store / f"checkpoints/{CHECKPOINT}"
        swap(base / name.format(2), base / name.format(3))


def swap_sample_ids(store: Path) -> None:
    """Swap the first two sample ids, rewritten as zarr writes them."""
    array = zarr.open_group(store, mode="r+")["sample_ids"]
    ids = array[:]
    array[:2] = ids[[1, 0]]


def damage_ann_file(store: Path) -> None:
    flip_first_bit(
        store / "ann" / json.loads((store / "ann/manifest.json").read_text())["methods"]["tracin"]["file"]
    )


def truncate_manifest(store: Path) -> None:
    manifest = store / "ann/manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])


Read = Callable[[GradientStore], Any]
READS: dict[str, Read] = {
    "scan": lambda s: [
        (c.projected.numpy(), c.norms.numpy()) for _, cs in s.chunks([0, 1, 2], 8) for c in cs
    ],
    "norms": lambda s: [s.norms(c) for c in range(3)],
    "timesteps": lambda s: [s.timesteps(c) for c in range(3)],
    "seeds": lambda s: [s.seeds(c) for c in range(3)],
    "timesteps_of": lambda s: [s.timesteps_of(c, ROWS) for c in range(3)],
    "rows_at": lambda s: [
        (r.projected.numpy(), r.norms.numpy()) for r in (s.rows_at(c, ROWS) for c in range(3))
    ],
    "sample_ids": lambda s: s.sample_ids,
    "ann": lambda s: load_ann(s).candidates(
        {m: np.ones((1, 3 * s.dim), dtype=np.float32) for m in METHODS}, 8, 8
    ),
}
"""Every read of a store's data, each giving what it read."""
ROW_READS = frozenset(("scan", "norms", "timesteps", "seeds", "timesteps_of", "rows_at"))


@dataclass(frozen=True)
class Damage:
    """How to damage a store; the error, and where it names, of the reads that must be refused; and
    whether they are refused resident too (else a verified copy in memory may still answer)."""

    apply: Callable[[Path], None]
    error: type[StoreError]
    names: str
    refused: frozenset[str] = ROW_READS
    resident_refused: bool = True


SHARD_NAMED = f"checkpoint {CHECKPOINT} shard {SHARD} "
DAMAGES: dict[str, Damage] = {
    "projected: flipped sign bits": Damage(in_row_file(0, flip_sign_bits), DamagedStoreError, SHARD_NAMED),
    "projected: NaN bytes": Damage(in_row_file(0, nan_bytes), DamagedStoreError, SHARD_NAMED),
    "norms: zeroed": Damage(in_row_file(1, zero_bytes), DamagedStoreError, SHARD_NAMED),
    "timesteps: one changed": Damage(in_row_file(2, add_one), DamagedStoreError, SHARD_NAMED),
    "seeds: one changed": Damage(in_row_file(3, add_one), DamagedStoreError, SHARD_NAMED),
    "digest: one bit flipped": Damage(
        in_shard_file("digest", flip_first_bit), DamagedStoreError, SHARD_NAMED
    ),
    "done mark: cleared": Damage(
        in_shard_file("done_at", zero_bytes), IncompleteStoreError, f"checkpoint {CHECKPOINT} "
    ),
    "checkpoints swapped": Damage(swap_checkpoints, DamagedStoreError, "checkpoint 0 shard 0 "),
    "shards swapped": Damage(swap_shards, DamagedStoreError, f"checkpoint {CHECKPOINT} shard [23] "),
    "sample ids swapped": Damage(
        swap_sample_ids, DamagedStoreError, "sample ids", frozenset({"sample_ids"}), resident_refused=False
    ),
    "ANN file: one bit flipped": Damage(
        damage_ann_file, AnnIndexError, "damaged", frozenset({"ann"}), resident_refused=False
    ),
    "ANN manifest: truncated": Damage(truncate_manifest, AnnIndexError, "unreadable", frozenset({"ann"})),
}


@pytest.fixture(scope="module")
def with_ann(reference_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the filled reference store with its ANN index built. Read-only."""
    path = tmp_path_factory.mktemp("with-ann") / "index.zarr"
    shutil.copytree(reference_store, path)
    build_ann(GradientStore.open(path))
    return path


@pytest.fixture(scope="module")
def undamaged(with_ann: Path) -> dict[str, Any]:
    """What every read answers on the undamaged store."""
    store = GradientStore.open(with_ann, check=False)
    return {name: read(store) for name, read in READS.items()}


def same(got: Any, want: Any) -> bool:
    """Whether two reads' answers are equal, array for array."""
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    return bool(got == want)


@pytest.mark.parametrize("mode", ["cold", "resident"])
@pytest.mark.parametrize("kind", list(DAMAGES))
def test_every_damage_is_refused_or_answers_as_undamaged(
    kind: str, mode: str, with_ann: Path, undamaged: dict[str, Any], tmp_path: Path
) -> None:
    damage, path = DAMAGES[kind], tmp_path / "index.zarr"
    shutil.copytree(with_ann, path)
    if mode == "resident":
        store = GradientStore.open(path, check=False)
        assert all(same(read(store), undamaged[name]) for name, read in READS.items())
        assert store.resident_nbytes > 0
    damage.apply(path)
    if mode == "cold":
        store = GradientStore.open(path, check=False)
    must_refuse = damage.refused if mode == "cold" or damage.resident_refused else frozenset()
    for name in sorted(set(READS) - must_refuse):
        try:
            got = READS[name](store)
        except StoreError:  # refusing is always right
            continue
        assert same(got, undamaged[name]), f"{name} answered differently from a damaged store"
    for name in sorted(must_refuse):
        with pytest.raises(damage.error, match=damage.names) as error:
            READS[name](store)
        assert str(path.parent) not in str(error.value)  # no server path in the message


def test_an_older_format_is_refused_with_how_to_rebuild(reference_store: Path, tmp_path: Path) -> None:
    shutil.copytree(reference_store, tmp_path / "index.zarr")
    zarr.open_group(tmp_path / "index.zarr", mode="r+").attrs["format"] = "retrac-store/2"
    with pytest.raises(
        StoreError, match="written in format retrac-store/2, this retrac reads retrac-store/3"
    ):
        GradientStore.open(tmp_path / "index.zarr")


@pytest.fixture
def damaged(tmp_path: Path, reference_store: Path) -> Path:
    """A copy of the filled reference store with the projected chunk of checkpoint 1, shard 3 damaged
    in place, its size unchanged (the cheap size check cannot see it)."""
    shutil.copytree(reference_store, tmp_path / "index.zarr")
    file = data_files(tmp_path / "index.zarr", CHECKPOINT, SHARD)[0]
    size = file.stat().st_size
    flip_sign_bits(file)
    assert file.stat().st_size == size
    return tmp_path / "index.zarr"


def test_a_damaged_shard_is_refused_naming_it_and_how_to_rebuild(damaged: Path) -> None:
    store = GradientStore.open(damaged, resident_bytes=0)
    assert store.status().complete  # the marks alone say done
    with pytest.raises(DamagedStoreError, match=SHARD_NAMED) as error:
        list(store.chunks([0, 1, 2], rows_per_chunk=8))
    assert "`retrac index status --verify STORE` then `retrac index run STORE`" in str(error.value)
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
