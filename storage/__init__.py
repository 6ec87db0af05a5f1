"""The Zarr gradient store: create an index, fill it shard by shard, and answer queries from it.

See `storage.store` for the on-disk layout and its rules (one writer per chunk, done marks after the
data, stale inputs refused).
"""

from storage.errors import (
    AnnIndexError,
    DamagedStoreError,
    DeletedStoreError,
    IncompleteStoreError,
    NothingToIndexError,
    StaleStoreError,
    StoreError,
)
from storage.ann import build_ann, build_ann_when_complete
from storage.cache import OpenStores
from storage.runner import run_pending, run_shard
from storage.progress import Progress, progress
from storage.statistics import StoredNorms, attribute, self_influence, stored_norms
from storage.store import CheckpointStatus, GradientStore, StoreStatus, delete_store, is_leftover

__all__ = [
    "AnnIndexError",
    "CheckpointStatus",
    "DamagedStoreError",
    "DeletedStoreError",
    "GradientStore",
    "IncompleteStoreError",
    "Progress",
    "StoredNorms",
    "NothingToIndexError",
    "OpenStores",
    "StaleStoreError",
    "StoreError",
    "StoreStatus",
    "attribute",
    "build_ann",
    "build_ann_when_complete",
    "delete_store",
    "is_leftover",
    "stored_norms",
    "progress",
    "run_pending",
    "run_shard",
    "self_influence",
]
