"""The contract every place a store lives keeps, as one suite each backend inherits: a local folder
and a bucket (moto's S3 server on loopback). Rows are written directly (no gradients computed), so
that each test checks the store alone: create, write a shard, done marks, verify, read back, delete,
list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrac.plan import Rows
from retrac.replay import TrainingRun
from storage import (
    DamagedStoreError,
    DeletedStoreError,
    GradientStore,
    Location,
    StoreError,
    delete_store,
    is_leftover,
    list_stores,
    locate,
)
from storage.store import mark_deleted
from tests.storage.helpers import SHARD_SIZE, tiny_index_spec
from tests.storage.object_store import bucket_url

CHECKPOINT, SHARD = 1, 2
"""The shard each test writes: not the first of anything, so that offsets are exercised."""


def synthetic_rows(store: GradientStore, seed: int) -> Rows:
    """One shard's rows of exactly representable values (float16-exact projections)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (store.shard_length(SHARD), store.num_slots)
    return Rows(
        projected=torch.randn((*shape, store.dim), generator=generator).half().float(),
        norms=torch.rand(shape, generator=generator) + 0.5,
        timesteps=torch.randint(0, 1000, shape, generator=generator),
        seeds=torch.randint(0, 2**62, shape, generator=generator),
    )


class StoreContract:
    """What a store keeps wherever it lives; a subclass gives `root`, where its stores are made."""

    @pytest.fixture
    def root(self) -> Location:
        raise NotImplementedError

    @pytest.fixture
    def store(self, root: Location, tiny_run: TrainingRun) -> GradientStore:
        return GradientStore.create(root.child("index"), tiny_index_spec(tiny_run))

    def test_a_new_store_is_listed_with_every_shard_pending(
        self, root: Location, store: GradientStore
    ) -> None:
        assert list_stores(root) == ["index"]
        reopened = GradientStore.open(root.child("index"), check=False)
        assert (reopened.spec, reopened.num_rows, reopened.shard_size) == (store.spec, 48, SHARD_SIZE)
        assert reopened.pending() == [(c, s) for c in range(3) for s in range(6)]
        assert not reopened.done_marks(CHECKPOINT).any()

    def test_a_written_shard_is_done_verified_and_reads_back_exactly(
        self, root: Location, store: GradientStore
    ) -> None:
        rows = synthetic_rows(store, seed=0)
        store.write_shard(CHECKPOINT, SHARD, rows)
        reader = GradientStore.open(root.child("index"), check=False, resident_bytes=0)  # another process
        marks = reader.done_marks(CHECKPOINT)
        assert marks[SHARD] > 0
        assert np.count_nonzero(marks) == 1
        assert reader.is_done(CHECKPOINT, SHARD)
        assert not reader.is_done(CHECKPOINT, SHARD - 1)
        assert reader.status(verify=True).done_shards == 1
        assert (CHECKPOINT, SHARD) not in reader.pending(verify=True)
        part = reader.shard_rows(SHARD)
        read = reader.rows_at(CHECKPOINT, np.arange(part.start, part.stop))
        assert torch.equal(read.projected.float(), rows.projected)
        assert torch.equal(read.norms, rows.norms)
        stored = reader.stored_rows(CHECKPOINT, np.arange(part.start, part.stop))
        assert np.array_equal(stored.timesteps, rows.timesteps.numpy())
        assert np.array_equal(stored.seeds, rows.seeds.numpy())

    def test_a_damaged_shard_is_refused_and_verify_makes_it_pending(
        self, root: Location, store: GradientStore
    ) -> None:
        store.write_shard(CHECKPOINT, SHARD, synthetic_rows(store, seed=0))
        part = store.shard_rows(SHARD)
        damaged = np.ones((part.stop - part.start, store.num_slots), np.float32)
        store._array(CHECKPOINT, "norms")[part] = damaged  # a whole chunk file of other bytes
        reader = GradientStore.open(root.child("index"), check=False, resident_bytes=0)
        assert reader.is_done(CHECKPOINT, SHARD)  # its files are whole: only their bytes are wrong
        with pytest.raises(DamagedStoreError, match=f"checkpoint {CHECKPOINT} shard {SHARD}"):
            reader.rows_at(CHECKPOINT, np.arange(part.start, part.stop))
        assert reader.status(verify=True).done_shards == 0
        assert (CHECKPOINT, SHARD) in reader.pending()

    def test_a_deleted_store_is_gone_from_listing_and_refuses_writes(
        self, root: Location, store: GradientStore, tiny_run: TrainingRun
    ) -> None:
        GradientStore.create(root.child("other"), tiny_index_spec(tiny_run))
        mark_deleted(root.child("index"))
        assert list_stores(root) == ["other"]
        assert is_leftover(root.child("index"))
        with pytest.raises(DeletedStoreError, match="being deleted"):
            store.write_shard(CHECKPOINT, SHARD, synthetic_rows(store, seed=0))
        delete_store(root.child("index"))
        assert list_stores(root) == ["other"]
        assert not is_leftover(root.child("index"))
        with pytest.raises(StoreError, match="not a retrac store"):
            GradientStore.open(root.child("index"))


class TestLocalFolder(StoreContract):
    @pytest.fixture
    def root(self, tmp_path: Path) -> Location:
        return locate(tmp_path / "stores")


class TestBucket(StoreContract):
    @pytest.fixture
    def root(self, bucket: str) -> Location:
        return bucket_url(bucket, "stores")
