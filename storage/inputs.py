"""Datasets, checkpoints and schedulers at `s3://` URLs, mirrored into a bounded local cache.

The engine reads its inputs from local files (`retrac.plan.IndexPlan.resolve`), with every check it
makes there: safetensors weights only, image sides bounded, sample ids that are relative paths. An
input given by URL is mirrored first, then resolved from its mirror exactly as a local one:

- A URL ending in `.npz` or `.npy` names one object (an array dataset); any other URL names a folder,
  every object under its prefix (an image folder, a diffusers model or pipeline folder, a scheduler or
  VAE folder). Only the kinds of file an input can be made of are mirrored: configs (`.json`),
  `.safetensors` weights, images, arrays, a tokenizer's merges (`.txt`) and an image folder's captions
  (`metadata.jsonl`). Pickled weights (`.bin`, `.ckpt`) are never fetched, so a checkpoint without
  safetensors weights is refused as a local one is.
- A mirror is keyed by the URL and the ETag and size of every object mirrored, so a changed object
  is fetched again into a new mirror: its content changes the store's fingerprints, and the store is
  stale as it is for a changed local file. Objects are written beside the mirror and renamed into
  place whole, so processes sharing the cache never read half a mirror.
- The cache holds at most `max_bytes`: an input larger than that is refused in one line, and the
  mirrors used least recently are removed to make room, but never one in use. A process holds a
  lease on every mirror of a spec it resolved (`InputMirrors`, kept by an opened store while it
  computes or answers from it, since it loads a checkpoint's weights lazily): a shared `flock` on the
  mirror's lease file, which eviction must take exclusively, so no process removes a mirror another
  still reads, and none outlives its holder (the kernel drops a dead process's locks). An input that
  does not fit beside the mirrors in use is refused in one line (size the cache above the inputs of
  the indexes in use). Keys that would leave the mirror's folder (`..`) are refused.
- Messages and a store's records name the URL, not the mirror (`InputMirrors.named`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec
from retrac.exceptions import SpecError
from retrac.paths import resolve_inside
from storage.location import BUCKET_SCHEME, BucketLocation, BucketOptions, locate

FILE_SUFFIXES = (".npz", ".npy")
"""A URL ending so names one object; any other names a folder (a prefix)."""
MIRRORED_SUFFIXES = frozenset(
    {".json", ".safetensors", ".npy", ".npz", ".txt", ".jsonl"}
    | {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
)
"""What a dataset (images, arrays, captions), a checkpoint, a pipeline's parts (a tokenizer's vocab and
merges among them), a scheduler or a VAE is made of; nothing else is fetched."""
DEFAULT_CACHE = Path("~/.cache/retrac/inputs")
DEFAULT_CACHE_BYTES = 20 << 30
_DONE = ".mirrored"
"""In a mirror's folder: the listing it was made from. A folder without it is not a mirror."""
_LEASE = ".{}.lease"
"""Beside a mirror's folder (named after it): the file its users lock shared and eviction exclusively.
Never removed, so every process locks the same file (one empty file per mirror ever made)."""


class Lease:
    """A shared lock on one mirror's lease file: while it is held, no process evicts the mirror."""

    def __init__(self, entry: Path) -> None:
        self._file: IO[bytes] | None = entry.with_name(_LEASE.format(entry.name)).open("ab")
        fcntl.flock(self._file, fcntl.LOCK_SH)  # waits only while an eviction of this mirror runs

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None

    def __del__(self) -> None:  # a dropped holder (an opened store let go) releases its mirrors
        self.release()


def is_url(path: str | None) -> bool:
    return path is not None and path.startswith(BUCKET_SCHEME)


@dataclass(frozen=True)
class InputCache:
    """Where inputs given by URL are mirrored, how many bytes at most, and how to reach their buckets."""

    folder: Path = DEFAULT_CACHE
    max_bytes: int = DEFAULT_CACHE_BYTES
    options: BucketOptions | None = None

    def localize(self, spec: IndexSpec) -> InputMirrors:
        """`spec` with every URL (dataset source, checkpoint paths, scheduler, VAE) replaced by the
        folder or file of its mirror, fetched now unless a mirror of the same objects exists."""
        mirrors: dict[str, Path] = {}
        leases: list[Lease] = []

        def local(path: str | None) -> str | None:
            if path is None or not is_url(path):
                return path
            if path not in mirrors:
                mirrors[path], lease = self.leased(path)
                leases.append(lease)
            return str(mirrors[path])

        if spec.run is not None and any(is_url(p) for p in (spec.run, *_urls(spec))):
            raise SpecError(
                "a training run is read from a local folder only; with checkpoints or a dataset at URLs, "
                "give the checkpoints (with epoch and lr, or weights) and the scheduler instead of the run"
            )
        try:
            source = local(spec.dataset.source)
            dataset = DatasetSpec.model_validate({**spec.dataset.model_dump(), "source": source})
            localized = spec.model_copy(
                update={
                    "dataset": dataset,
                    "scheduler": local(spec.scheduler),
                    "vae": local(spec.vae),
                    "base": local(spec.base),
                    "checkpoints": tuple(
                        CheckpointSpec.model_validate({**c.model_dump(), "path": local(c.path)})
                        for c in spec.checkpoints
                    ),
                }
            )
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return InputMirrors(localized, {url: str(path) for url, path in mirrors.items()}, tuple(leases))

    def stamp(self, url: str) -> tuple[tuple[str, str, int], ...]:
        """(key, ETag, size) of every object the input at `url` is mirrored from: one listing, and
        different once any of them is rewritten."""
        location, single = self._location(url)
        if single is not None:
            found = location.stamp(single)
            if found is None:
                raise SpecError(f"{url}: no such object in the bucket")
            return ((single, str(found[0]), int(found[1])),)
        listed = location.stamps()
        kept = [  # hidden files are no part of an input, as in a local folder
            (key, str(etag), int(size))
            for key, (etag, size) in sorted(listed.items())
            if Path(key).suffix.lower() in MIRRORED_SUFFIXES
            and not any(p.startswith(".") for p in key.split("/"))
        ]
        if not kept:
            raise SpecError(f"{url}: no objects under this prefix (nothing to read as a dataset or model)")
        return tuple(kept)

    def mirror(self, url: str) -> Path:
        """The local folder (or, for a file URL, file) mirroring the input at `url`, leased only while
        it is found or fetched: a caller that reads it later holds a lease (`leased`)."""
        path, lease = self.leased(url)
        lease.release()
        return path

    def leased(self, url: str) -> tuple[Path, Lease]:
        """`mirror`'s path, and a lease that keeps it from eviction until released."""
        listing = self.stamp(url)
        total = sum(size for _, _, size in listing)
        if total > self.max_bytes:
            raise SpecError(
                f"{url}: {total} bytes, more than the input cache holds ({self.max_bytes} bytes); raise "
                "RETRAC_INPUT_CACHE_BYTES or give a smaller input"
            )
        folder = self.folder.expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        entry = folder / hashlib.sha256(json.dumps([url, listing]).encode()).hexdigest()[:32]
        lease = Lease(entry)  # before looking: a mirror found is then one no eviction is removing
        try:
            if not (entry / _DONE).is_file():
                self._fetch(url, listing, entry, total)
            os.utime(entry / _DONE)  # used now: the last to be evicted
        except BaseException:
            lease.release()
            raise
        _, single = self._location(url)
        return (entry / single if single is not None else entry), lease

    def _fetch(self, url: str, listing: tuple[tuple[str, str, int], ...], entry: Path, total: int) -> None:
        """Fetch every object of `listing` into a new folder beside `entry`, then rename it into place."""
        location, _ = self._location(url)
        self._make_room(url, total)
        aside = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}")
        aside.mkdir(parents=True)
        try:
            for key, _, _ in listing:
                location.download(key, resolve_inside(aside, key))  # a key with '..' is refused
            (aside / _DONE).write_text(json.dumps({"url": url, "objects": listing}))
            try:
                os.rename(aside, entry)
            except OSError:  # another process mirrored the same objects meanwhile: theirs is as good
                if not (entry / _DONE).is_file():
                    raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)

    def _make_room(self, url: str, needed: int) -> None:
        """Remove the mirrors used least recently, none in use (leased), until the `needed` bytes of
        the input at `url` fit under `max_bytes`; a SpecError if the mirrors in use leave no room."""
        mirrors = sorted(self._mirrors(), key=lambda m: (m / _DONE).stat().st_mtime)
        sizes = {mirror: _size(mirror) for mirror in mirrors}
        used = sum(sizes.values())
        for mirror in mirrors:
            if used + needed <= self.max_bytes:
                return
            if _evict(mirror):
                used -= sizes[mirror]
        if used + needed > self.max_bytes:
            raise SpecError(
                f"{url}: {needed} bytes do not fit in the input cache ({self.max_bytes} bytes) beside the "
                f"inputs in use ({used} bytes); raise RETRAC_INPUT_CACHE_BYTES above the inputs of the "
                "indexes in use"
            )

    def _mirrors(self) -> Iterator[Path]:
        folder = self.folder.expanduser()
        return (m for m in folder.iterdir() if (m / _DONE).is_file()) if folder.is_dir() else iter(())

    def _location(self, url: str) -> tuple[BucketLocation, str | None]:
        """The bucket location to list and fetch from, and for a file URL its object's key in it."""
        if url.rstrip("/").lower().endswith(FILE_SUFFIXES):
            parent, _, name = url.rstrip("/").rpartition("/")
            location = locate(parent, self.options)
            single: str | None = name
        else:
            location, single = locate(url, self.options), None
        assert isinstance(location, BucketLocation)
        return location, single


@dataclass(frozen=True)
class InputMirrors:
    """A spec with its URLs replaced by local mirrors, and which mirror stands for which URL."""

    spec: IndexSpec
    urls: dict[str, str]
    """URL -> its mirror's local path."""
    leases: tuple[Lease, ...] = ()
    """One per mirror, held until `release`: whoever computes from `spec` keeps these mirrors."""

    def release(self) -> None:
        """Let the mirrors be evicted again (their reader is done with them)."""
        for lease in self.leases:
            lease.release()

    @contextmanager
    def released_on_error(self) -> Iterator[None]:
        """Release the leases if the block fails: no plan it would have made reads these mirrors."""
        try:
            yield
        except BaseException:
            self.release()
            raise

    def named(self, text: str) -> str:
        """`text` (a message, a recorded path) with each mirror's path replaced by its URL."""
        for url, path in sorted(self.urls.items(), key=lambda item: -len(item[1])):
            text = text.replace(path, url)
        return text


def _urls(spec: IndexSpec) -> list[str | None]:
    return [spec.dataset.source, spec.scheduler, spec.vae, spec.base, *(c.path for c in spec.checkpoints)]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _evict(mirror: Path) -> bool:
    """Remove `mirror` unless some process (this one included) holds a lease on it; whether it went."""
    with mirror.with_name(_LEASE.format(mirror.name)).open("ab") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(mirror, ignore_errors=True)  # under the lock: no reader can take a lease meanwhile
        return True


_current = InputCache()


def use_inputs(cache: InputCache) -> None:
    """Make `cache` where this process mirrors inputs given by URL (the settings of the service, a
    worker or the CLI); until then, `DEFAULT_CACHE` reached by the AWS environment variables."""
    global _current
    _current = cache


def current_inputs() -> InputCache:
    return _current
