"""Named errors of the gradient store. Each message says what is wrong and what to do about it."""

from retrac.exceptions import RetracError


class StoreError(RetracError):
    """A path is not a readable retrac store, or a request does not fit the store (shard, shape, ...)."""


class StaleStoreError(StoreError):
    """The store was built from checkpoints, a dataset or a replay record that have since changed."""


class IncompleteStoreError(StoreError):
    """A read needs rows whose shards are not done yet."""


class NothingToIndexError(StoreError):
    """A job was asked for a store whose shards are all done."""


class DamagedStoreError(StoreError):
    """A shard marked done holds bytes that do not match its done mark's digest: never scored."""


class UnreachableStoreError(StoreError, ConnectionError):
    """The object store holding a store did not answer as expected (endpoint, bucket, credentials or
    the network). A ConnectionError too, so that a worker retries it with backoff."""


class DeletedStoreError(StoreError):
    """The store was deleted (or deleted and recreated) since it was opened: nothing more is written."""


class AnnIndexError(StoreError):
    """An approximate search was asked of a store whose ANN index is missing, stale or damaged."""
