"""The Zarr gradient store: create an index, fill it shard by shard, and answer queries from it.

See docs/store-format.md for the on-disk layout and its rules (one writer per chunk, done marks after the
data, stale inputs refused), and `storage.location` for where a store lives: a folder or a bucket.
"""

from storage.ann import build_ann, build_ann_when_complete
from storage.cache import OpenStores
from storage.errors import (
    AnnIndexError,
    DamagedStoreError,
    DeletedStoreError,
    IncompleteStoreError,
    NothingToIndexError,
    StaleStoreError,
    StoreError,
    UnreachableStoreError,
)
from storage.location import BucketLocation, BucketOptions, LocalLocation, Location, locate
from storage.progress import Progress, progress
from storage.queries import (
    StoredNorms,
    attribute,
    outlier_scores,
    query_gradients,
    self_influence,
    stored_norms,
)
from storage.runner import run_pending, run_shard
from storage.store import (
    CheckpointStatus,
    GradientStore,
    StoreStatus,
    delete_store,
    is_leftover,
    list_stores,
)

__all__ = [
    "AnnIndexError",
    "BucketLocation",
    "BucketOptions",
    "CheckpointStatus",
    "DamagedStoreError",
    "DeletedStoreError",
    "GradientStore",
    "IncompleteStoreError",
    "LocalLocation",
    "Location",
    "Progress",
    "StoredNorms",
    "NothingToIndexError",
    "OpenStores",
    "StaleStoreError",
    "StoreError",
    "StoreStatus",
    "UnreachableStoreError",
    "attribute",
    "build_ann",
    "build_ann_when_complete",
    "delete_store",
    "is_leftover",
    "list_stores",
    "locate",
    "stored_norms",
    "progress",
    "query_gradients",
    "run_pending",
    "run_shard",
    "outlier_scores",
    "self_influence",
]
