"""The gradient store: `GradientStore`, one index in a folder or a bucket (docs/store-format.md).

A thin facade over three layers, each a module of one job: `storage.layout` (array names, shapes,
creation, attributes), `storage.shards` (writing shards, digests, done marks, verification, status)
and `storage.reading` (resident loads, scan chunks, rows by index). This module creates and opens
stores, checks them against their inputs (`storage.freshness`), and resolves their plan.
`create` refuses a non-empty folder that is not the same index; `open` refuses what is not a store
of this format, or is being deleted; with `check`, a StaleStoreError names the input that changed.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import zarr

from api_schemas import IndexSpec
from retrac.exceptions import RetracError
from retrac.plan import IndexPlan, pin_checkpoints
from storage.errors import DeletedStoreError, StaleStoreError, StoreError, UnreachableStoreError
from storage.freshness import REBUILD, changes
from storage.inputs import InputMirrors, current_inputs, is_url
from storage.layout import (
    DELETED_MARK,
    FORMAT,
    NOISE_RULE,
    ROW_ARRAYS,
    SHARD_ARRAYS,
    ZARR_DTYPES,
    create_arrays,
    describe,
    open_group,
)
from storage.lifecycle import delete_store, is_leftover, list_stores, mark_deleted, remove_set_aside
from storage.location import Location, locate
from storage.reading import DEFAULT_RESIDENT_BYTES, RESIDENT_STEP, ReadableStore
from storage.shards import CheckpointStatus, StoreStatus, ids_digest, write_latents

__all__ = [
    "DEFAULT_RESIDENT_BYTES",
    "DELETED_MARK",
    "FORMAT",
    "NOISE_RULE",
    "RESIDENT_STEP",
    "ROW_ARRAYS",
    "SHARD_ARRAYS",
    "ZARR_DTYPES",
    "CheckpointStatus",
    "GradientStore",
    "StoreStatus",
    "delete_store",
    "is_leftover",
    "list_stores",
    "mark_deleted",
    "remove_set_aside",
]


class GradientStore(ReadableStore):
    """An index in a folder or a bucket. Build one with `create`, reopen it with `open`; never
    construct directly. `location` is where it lives (`storage.location`); `path` is its folder, or
    for a store in a bucket its `BucketLocation` (printable as its URL, with a `name` too)."""

    def __init__(
        self, location: Location, group: zarr.Group, *, root: Path | None, resident_bytes: int
    ) -> None:
        super().__init__(location, group, resident_bytes=resident_bytes)
        recorded = self.attrs.get("root")
        self.root = root if root is not None else (Path(recorded) if recorded else None)
        self._plan: IndexPlan | None = None
        self._inputs: InputMirrors | None = None
        """The mirrors of the plan's inputs at URLs, leased while this store may read them: until the
        store is dropped (a long-lived process drops it when it reopens a changed store)."""

    @classmethod
    def create(
        cls,
        path: str | Path | Location,
        spec: IndexSpec,
        *,
        root: Path | None = None,
        data_root: Path | None = None,
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    ) -> GradientStore:
        """Write an empty store for `spec` at `path` (nothing done yet) and return it opened.

        With `data_root`, the dataset's files must lie inside it, now and whenever the store is
        reopened (it is recorded), so a link added to an image folder later cannot lead outside.

        An existing store with the same spec is reopened (and checked); one with another spec, or any
        other non-empty folder, is refused rather than overwritten. The spec is recorded with its run's
        checkpoints written in (`pin_checkpoints`), so the run may go on training.
        """
        path = locate(path)
        requested, spec = spec, pin_checkpoints(spec, root)
        if path.has("zarr.json"):
            existing = cls.open(path, root=root, check=False, resident_bytes=resident_bytes)
            if existing.spec not in (requested, spec):
                raise StoreError(
                    f"{path.name} already holds a different index; choose another path or delete it"
                )
            existing.check()
            return existing
        if not path.is_empty():
            raise StoreError(f"{path.name} exists and is not a retrac store; choose another path")
        plan, mirrors = _resolve(spec, root, path, data_root=data_root)
        with mirrors.released_on_error():
            store = cls._created(path, spec, plan, mirrors, root, data_root, resident_bytes)
        store._plan, store._inputs = plan, mirrors
        return store

    @classmethod
    def _created(
        cls,
        path: Location,
        spec: IndexSpec,
        plan: IndexPlan,
        mirrors: InputMirrors,
        root: Path | None,
        data_root: Path | None,
        resident_bytes: int,
    ) -> GradientStore:
        """`create`'s writing: the group, its arrays and its attributes, last."""
        attrs = {
            **describe(plan, mirrors),
            "root": str(Path(root).resolve()) if root is not None else None,
            "data_root": str(Path(data_root).resolve()) if data_root is not None else None,
            "uid": uuid.uuid4().hex,  # tells this store from a later one at the same path
            "sample_ids_digest": ids_digest(plan.dataset.ids),
        }
        group = zarr.open_group(path.zarr_store(), mode="w-", zarr_format=3)
        create_arrays(group, attrs, plan.dataset.ids, spec.dtype)
        if plan.latent_space is not None:
            attrs["latents_digest"] = write_latents(group, plan.inputs, attrs["shard_size"])
        group.attrs.update(attrs)  # last: a folder without `format` is an unfinished create, not a store
        return cls(path, group, root=root, resident_bytes=resident_bytes)

    @classmethod
    def open(
        cls,
        path: str | Path | Location,
        *,
        root: Path | None = None,
        check: bool = True,
        resident_bytes: int = DEFAULT_RESIDENT_BYTES,
    ) -> GradientStore:
        """Open the store at `path`. With `check`, a StaleStoreError if its inputs changed since.

        Paths in the spec resolve inside `root`, by default the root the store was created with, so a
        worker opens a service's store without knowing the service's folders.
        """
        path = locate(path)
        if not path.has("zarr.json"):
            raise StoreError(
                f"{path.name} is not a retrac store (no zarr.json); create one with `retrac index create`"
            )
        if path.has(DELETED_MARK):
            raise DeletedStoreError(
                f"{path.name} is being deleted, or its deletion was interrupted; finish it with "
                f"`retrac index delete {path}`"
            )
        group = open_group(path)
        store = cls(path, group, root=root, resident_bytes=resident_bytes)
        if check:
            store.check()
        return store

    def check(self) -> None:
        """A StaleStoreError naming what changed, if the checkpoints, data, record or schedule did."""
        data_root = Path(self.attrs["data_root"]) if self.attrs.get("data_root") else None
        plan, mirrors = _resolve(self.spec, self.root, self.path, data_root=data_root, stale=True)
        with mirrors.released_on_error():
            changed = mirrors.named("; ".join(changes(self.attrs["fingerprints"], plan, self.sample_ids)))
            if changed:
                raise StaleStoreError(
                    f"{self.path.name} is stale: {changed}; restore the input, or {REBUILD}"
                )
            self._plan = plan if plan.latent_space is None else plan.with_latents(self._stored_latents())
        previous, self._inputs = self._inputs, mirrors
        if previous is not None:
            previous.release()

    @property
    def plan(self) -> IndexPlan:
        """The resolved plan (dataset loaded, checkpoints checked), resolved and checked on first use:
        a store opened with `check=False` still never computes from changed inputs."""
        if self._plan is None:
            self.check()
        return self._plan  # type: ignore[return-value]

    def signature(self) -> tuple[Any, ...]:
        """The stamp of the group's metadata (`Location.stamp`) and (inode, mtime, size) of every
        checkpoint, VAE, text encoder and tokenizer file: cheap to read on every use, and different
        after the store is deleted and recreated or a checkpoint or the VAE replaced. Long-lived
        processes compare it to reopen (and recheck) a store instead of using it stale."""
        inputs = current_inputs()
        folders = [c["path"] for c in self.checkpoint_info]
        folders += [self.attrs["vae"]["folder"]] if self.attrs.get("vae") else []
        text = self.attrs.get("text")
        folders += [text["text_encoder"], text["tokenizer"]] if text else []
        stamps = [  # at a URL: the ETags of its objects, one listing
            inputs.stamp(path) if is_url(path) else tuple(_stat(f) for f in sorted(Path(path).rglob("*")))
            for path in folders
        ]
        return (self.location.stamp("zarr.json"), *stamps)


def _resolve(
    spec: IndexSpec, root: Path | None, path: Path | Location, *, data_root: Path | None, stale: bool = False
) -> tuple[IndexPlan, InputMirrors]:
    """The spec's plan, its inputs at URLs read from their local mirrors (`storage.inputs`), and the
    mirrors; when reopening a store, a failure to resolve means its inputs changed."""
    mirrors: InputMirrors | None = None
    try:
        mirrors = current_inputs().localize(spec)
        with mirrors.released_on_error():
            if is_url(spec.dataset.source):  # its files must stay inside its mirror
                local = Path(mirrors.spec.dataset.source)
                data_root = local if local.is_dir() else local.parent
            plan = IndexPlan.resolve(mirrors.spec, root, data_root=data_root)
    except UnreachableStoreError:  # the inputs' bucket is out of reach: no input changed
        raise
    except RetracError as error:
        message = mirrors.named(str(error)) if mirrors is not None else str(error)
        if not stale:
            if message == str(error):
                raise
            raise type(error)(message) from error
        raise StaleStoreError(
            f"{path.name} is stale: its inputs no longer resolve: {message}; put them back where they were "
            f"(its paths are recorded absolute), or {REBUILD}"
        ) from error
    return dataclasses.replace(plan, spec=spec), mirrors


def _stat(file: Path) -> tuple[int, int, int] | None:
    try:
        info = file.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size
