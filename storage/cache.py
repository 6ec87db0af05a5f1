"""`OpenStores`: the stores a long-lived process (a service, a worker) keeps opened.

Opening checks a store against its inputs (fingerprints), which costs a dataset load; a process
keeps each store opened and reopens (and so rechecks) it only when its files change: another process
may delete and recreate a store at the same path, or replace a checkpoint.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from storage.location import BucketOptions, Location, locate
from storage.store import GradientStore


class OpenStores:
    """Opened stores by location, each with the `signature` it had when opened; safe to share between
    threads. `options` say how to reach buckets that stores given by URL live in. `hits` and `misses`
    count the `get`s answered by a kept store and those that opened one."""

    def __init__(self, options: BucketOptions | None = None) -> None:
        self.options = options
        self._open: dict[Location, tuple[tuple[Any, ...], GradientStore]] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, path: str | Path | Location) -> GradientStore:
        """The store at `path`, opened (and checked) again if its files changed since it was opened."""
        location = locate(path, self.options)
        with self._lock:
            cached = self._open.get(location)
            if cached is not None and cached[0] == cached[1].signature():
                self.hits += 1
                return cached[1]
            self.misses += 1
            store = GradientStore.open(location)
            self._open[location] = (store.signature(), store)
            return store

    def put(self, store: GradientStore) -> None:
        """Keep a store this process has just created."""
        with self._lock:
            self._open[store.location] = (store.signature(), store)

    def stores(self) -> list[GradientStore]:
        """The stores kept now."""
        with self._lock:
            return [store for _, store in self._open.values()]

    def forget(self, path: str | Path | Location) -> None:
        with self._lock:
            self._open.pop(locate(path, self.options), None)
