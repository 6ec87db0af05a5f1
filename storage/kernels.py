"""Each checkpoint's TRAK kernel (`retrac.kernels`) stored beside its rows, verified and kept current.

Layout, for a spec with `kernel` set (k projected dims):

    checkpoints/<c>/kernel     (k, k) float64, one chunk: the lower Cholesky factor L of
                               F = Phi^T Phi + lambda I (`retrac.kernels`), over the rows as stored
      attributes               ridge (lambda), trace (of Phi^T Phi), rows (N), digest (xxh3_64 of
                               the factor's bytes), rows_digest (xxh3_64 of the checkpoint's shard
                               digests when it was built), built_at (unix time; written last)

A kernel is built once every shard of its checkpoint is done (`build_kernel_when_complete`: the
embedded runner and the worker task that completes a checkpoint both call it) by one writer, the
factor first and its attributes last, so a half-written kernel has no `built_at` and counts as
missing. Reading (`load_kernel`) refuses a kernel whose shards changed since it was built
(StaleStoreError) or whose bytes do not match its digest (DamagedStoreError), each naming the
command that rebuilds it. A loaded kernel is kept per opened store while its digests hold.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np
import torch
import xxhash
import zarr

from retrac.exceptions import SpecError
from retrac.kernels import Kernel, KernelBuilder
from storage.errors import DamagedStoreError, IncompleteStoreError, StaleStoreError
from storage.store import GradientStore

_loaded: weakref.WeakKeyDictionary[GradientStore, dict[int, tuple[int, Kernel]]] = weakref.WeakKeyDictionary()
"""Per opened store: checkpoint -> (rows digest it was built over, the kernel)."""


def _group(store: GradientStore) -> zarr.Group:
    return zarr.open_group(store.location.zarr_store(), mode="r+", zarr_format=3)


def _digest(values: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(values).data)


def _rows_digest(store: GradientStore, checkpoint: int) -> int:
    return _digest(store.shard_digests(checkpoint))


def _stored(store: GradientStore, checkpoint: int) -> zarr.Array | None:
    try:
        array = _group(store)[f"checkpoints/{checkpoint}/kernel"]
    except KeyError:
        return None
    return array if isinstance(array, zarr.Array) and "built_at" in array.attrs else None


def kernel_pending(store: GradientStore, checkpoint: int) -> bool:
    """Whether the spec asks for a kernel of `checkpoint` and none is built over its current rows."""
    if store.spec.kernel is None:
        return False
    array = _stored(store, checkpoint)
    if array is None:
        return True
    return int(str(array.attrs["rows_digest"])) != _rows_digest(store, checkpoint) or not _intact(array)


def _intact(array: zarr.Array) -> bool:
    try:
        factor = np.asarray(array[:], dtype=np.float64)
    except Exception:  # a missing or truncated chunk
        return False
    return _digest(factor) == int(str(array.attrs["digest"]))


def build_kernel(store: GradientStore, checkpoint: int) -> Kernel:
    """Build, store and return the kernel of one complete checkpoint (IncompleteStoreError if it is not)."""
    if store.spec.kernel is None:
        raise SpecError(f"{store.path.name} was created without --kernel; create an index with it")
    missing = int((~store.done_shards(checkpoint)).sum())
    if missing:
        raise IncompleteStoreError(
            f"{store.path.name}: checkpoint {checkpoint} has {missing} shards not done; its kernel needs "
            "them all (`retrac index run`)"
        )
    rows_digest = _rows_digest(store, checkpoint)
    builder = KernelBuilder(store.dim)
    for _, (chunk,) in store.chunks([checkpoint]):
        builder.add(chunk)
    kernel = builder.finish(store.spec.kernel)
    factor = np.ascontiguousarray(kernel.factor.numpy())
    store.require_live()
    array = _group(store).create_array(
        f"checkpoints/{checkpoint}/kernel", shape=factor.shape, chunks=factor.shape, dtype="float64",
        compressors=None, overwrite=True,
    )
    array[:] = factor
    array.attrs.update(_attributes(kernel, factor, rows_digest))  # last: built_at marks it done
    _loaded.setdefault(store, {})[checkpoint] = (rows_digest, kernel)
    return kernel


def _attributes(kernel: Kernel, factor: np.ndarray, rows_digest: int) -> dict[str, Any]:
    return {
        "ridge": kernel.ridge, "trace": kernel.trace, "rows": kernel.rows,
        "digest": str(_digest(factor)), "rows_digest": str(rows_digest),
        "built_at": time.time(),
    }


def build_kernel_when_complete(store: GradientStore, checkpoint: int) -> bool:
    """Build the kernel of `checkpoint` if the spec asks for one, every shard is done and none is
    current; returns whether it built."""
    if not kernel_pending(store, checkpoint) or not store.done_shards(checkpoint).all():
        return False
    build_kernel(store, checkpoint)
    return True


def load_kernel(store: GradientStore, checkpoint: int) -> Kernel:
    """The stored kernel of `checkpoint`, checked against its rows and its digest."""
    if store.spec.kernel is None:
        raise SpecError(
            f"{store.path.name} has no TRAK kernel (methods trak, dtrak): create an index with --kernel"
        )
    rows_digest = _rows_digest(store, checkpoint)
    cached = _loaded.get(store, {}).get(checkpoint)
    if cached is not None and cached[0] == rows_digest:
        return cached[1]
    array = _stored(store, checkpoint)
    rebuild = f"`retrac index run {store.path}`"
    if array is None:
        raise IncompleteStoreError(
            f"{store.path.name}: checkpoint {checkpoint}'s kernel is not built; build it with {rebuild}"
        )
    if int(str(array.attrs["rows_digest"])) != rows_digest:
        raise StaleStoreError(
            f"{store.path.name}: checkpoint {checkpoint}'s kernel is stale (a shard changed since it was "
            f"built); rebuild it with {rebuild}"
        )
    if not _intact(array):
        raise DamagedStoreError(
            f"{store.path.name}: checkpoint {checkpoint}'s kernel does not match its digest; rebuild it "
            f"with {rebuild}"
        )
    factor = np.asarray(array[:], dtype=np.float64)
    attrs = array.attrs
    ridge, trace, rows = (float(str(attrs[name])) for name in ("ridge", "trace", "rows"))
    kernel = Kernel(torch.from_numpy(factor), ridge, trace, int(rows))
    _loaded.setdefault(store, {})[checkpoint] = (rows_digest, kernel)
    return kernel


def kernel_bytes(store: GradientStore) -> int:
    """Bytes the store's kernels take (0 without any)."""
    return sum(int(a.nbytes) for c in range(store.num_checkpoints) if (a := _stored(store, c)) is not None)
