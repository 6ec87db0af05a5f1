"""Stores at a location as a whole: listing them, marking and deleting them, what a deletion leaves.

Deleting is safe against workers writing the store: it is marked first (`DELETED_MARK`, which every
writer checks), then removed so that no listing sees half a store (`Location.remove`). A folder or
prefix without `zarr.json`, or marked deleted, is a leftover (`is_leftover`), never a store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from storage.layout import DELETED_MARK
from storage.location import ASIDE_PREFIX, BucketLocation, LocalLocation, Location, locate

__all__ = ["delete_store", "is_leftover", "list_stores", "mark_deleted", "remove_set_aside"]


def mark_deleted(path: str | Path | Location) -> None:
    """Mark the store at `path` as being deleted (see `delete_store`)."""
    location = locate(path)
    if location.exists():
        location.write(DELETED_MARK, b"")


def delete_store(path: str | Path | Location) -> None:
    """Delete the store at `path`, safe against workers writing it: mark it, then remove it so that no
    listing sees half a store (a folder is moved aside in one rename, so `path` is free at once; in a
    bucket `zarr.json` goes first, then the other objects; `Location.remove`).

    A worker that passed its last check before the mark may still write one shard under `path`; that
    leaves a folder (or prefix) without `zarr.json`, which `is_leftover` recognises and the next create
    clears.
    """
    locate(path).remove(DELETED_MARK)


def remove_set_aside(root: Path | Location) -> None:
    """Finish every deletion under the folder `root` that was killed after its rename: the folders set
    aside are no store's any more (their names are free), only their files are left to remove. A
    bucket sets nothing aside (`BucketLocation.remove`)."""
    if isinstance(root, BucketLocation):
        return
    folder = root.folder if isinstance(root, LocalLocation) else root
    for aside in folder.glob(f"{ASIDE_PREFIX}*") if folder.is_dir() else ():
        shutil.rmtree(aside, ignore_errors=True)


def is_leftover(path: str | Path | Location) -> bool:
    """Something without `zarr.json`, or marked deleted: what a deletion leaves, never a store."""
    location = locate(path)
    return location.exists() and (not location.has("zarr.json") or location.has(DELETED_MARK))


def list_stores(root: str | Path | Location) -> list[str]:
    """Names of the stores directly under `root` (a folder or a bucket prefix), sorted; hidden names
    and what a deletion left are not stores."""
    return [
        child.name
        for child in locate(root).children()
        if not child.name.startswith(".") and child.has("zarr.json") and not child.has(DELETED_MARK)
    ]
