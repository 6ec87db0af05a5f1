"""Where a store lives: a local folder, or a prefix in an S3-compatible bucket (`s3://bucket/prefix`).

`GradientStore` reads and writes its arrays through zarr (a `LocalStore`, or zarr's `ObjectStore` over
obstore), and the few files it handles itself (the group's `zarr.json`, the deleted mark, chunk sizes)
through the `Location` here, so that both kinds of store follow one set of rules:

- A shard's chunks are written first and its done mark last, each chunk one file or one object. A
  local write of a chunk and an object PUT are both all-or-nothing for readers (zarr writes a local
  chunk by rename; S3 makes an object visible whole, with read-after-write consistency), so a reader
  that trusts only done marks never sees half a shard.
- Deleting marks the store first, then removes its `zarr.json` (no listing shows it from then on),
  then the rest; a local folder is renamed aside in one step instead.

Buckets go through obstore (PyPI `obstore`, zarr 3's `zarr.storage.ObjectStore` backend), not
fsspec/s3fs: one Rust wheel with no botocore pin to clash with other AWS tools, the standard AWS
environment variables read by the backend itself (`AWS_ENDPOINT_URL`, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, web-identity and
container credentials), and requests issued concurrently from zarr's event loop.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar, cast

import obstore
from obstore.exceptions import BaseError as ObjectStoreError
from obstore.exceptions import InvalidPathError
from obstore.store import S3Store
from zarr.abc.store import Store
from zarr.storage import LocalStore, ObjectStore

from storage.errors import StoreError, UnreachableStoreError

BUCKET_SCHEME = "s3://"
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9._-]+")
_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
"""Any of these lets the backend sign requests (static keys, web identity, container credentials)."""

ASIDE_PREFIX = ".deleted-"
"""A local store being deleted is renamed to a hidden sibling starting so (`LocalLocation.remove`)."""

RETRIES = 3
"""Attempts per request after the first, with backoff: enough for a busy server, short enough that
a wrong endpoint is refused in seconds rather than obstore's default minutes."""
RETRY_TIMEOUT = timedelta(seconds=20)
CONNECT_TIMEOUT_S = 5.0
"""Default seconds to open a connection (`RETRAC_S3_CONNECT_TIMEOUT`)."""
READ_TIMEOUT_S = 30.0
"""Default seconds a request may wait for its next bytes (`RETRAC_S3_READ_TIMEOUT`): a server that
accepts a connection and never answers fails the request after this, retries included at most
(RETRIES + 1) times, instead of hanging a query or a command."""
REQUEST_TIMEOUT = timedelta(days=1)
"""No practical cap on a request that keeps receiving bytes (obstore's default cuts every request at
30 s, a multi-gigabyte checkpoint included): stalls are caught by the read timeout instead."""

TRANSIENT_STORE_ERRORS: tuple[type[Exception], ...] = (ObjectStoreError,)
"""Errors of the object-store backend (network, throttling) that a task may retry with backoff."""


@dataclass(frozen=True)
class BucketOptions:
    """How to reach the S3-compatible service; a None field is left to the AWS environment variables."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    allow_http: bool | None = None
    """Plain HTTP to the endpoint (a test server, MinIO on a private network); default AWS_ALLOW_HTTP."""
    connect_timeout: float = CONNECT_TIMEOUT_S
    """Seconds to open a connection to the endpoint."""
    read_timeout: float = READ_TIMEOUT_S
    """Seconds a request may wait for the server's next bytes (its answer, or more of a download)."""

    def config(self) -> dict[str, Any]:
        """The S3Store configuration these options set (the backend reads the environment for the rest)."""
        given = {
            "endpoint": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }
        return {key: value for key, value in given.items() if value is not None}

    def has_credentials(self, environment: Mapping[str, str]) -> bool:
        return self.access_key_id is not None or any(environment.get(v) for v in _CREDENTIAL_VARIABLES)


@dataclass(frozen=True)
class LocalLocation:
    """A store in a local (or mounted) folder."""

    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name

    def __str__(self) -> str:
        return str(self.folder)

    def zarr_store(self) -> Store:
        return LocalStore(self.folder)

    def child(self, name: str) -> LocalLocation:
        return LocalLocation(self.folder / name)

    def children(self) -> list[LocalLocation]:
        """The folders directly inside, sorted by name."""
        if not self.folder.is_dir():
            return []
        return [LocalLocation(p) for p in sorted(self.folder.iterdir()) if p.is_dir()]

    def exists(self) -> bool:
        """Whether anything is there (an empty folder counts)."""
        return self.folder.exists()

    def is_empty(self) -> bool:
        """Whether a new store may be created here: nothing there, or an empty folder."""
        return not self.folder.exists() or (self.folder.is_dir() and not any(self.folder.iterdir()))

    def has(self, key: str) -> bool:
        return (self.folder / key).is_file()

    def delete(self, key: str) -> None:
        """Remove file `key`; nothing if it is missing."""
        (self.folder / key).unlink(missing_ok=True)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.folder / key).read_bytes()
        except OSError:
            return None

    def write(self, key: str, data: bytes) -> None:
        """Write `key` whole or not at all (aside, then renamed into place), as an object put is."""
        file = self.folder / key
        file.parent.mkdir(parents=True, exist_ok=True)
        aside = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}")
        aside.write_bytes(data)
        os.replace(aside, file)

    def size(self, key: str) -> int | None:
        try:
            return (self.folder / key).stat().st_size
        except OSError:
            return None

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every file under `prefix` (a folder), keyed by its path relative to the store."""
        base = self.folder / prefix
        return {str(f.relative_to(self.folder)): f.stat().st_size for f in base.rglob("*") if f.is_file()}

    def stamps(self, prefix: str = "") -> dict[str, tuple[int, int, int]]:
        """(inode, mtime, size) of every file under `prefix` (a folder), keyed by its path relative to
        the store: different once a file is rewritten, replaced or moved."""
        stamps = {}
        for folder, _, names in os.walk(self.folder / prefix):
            for name in names:
                file = os.path.join(folder, name)
                try:
                    info = os.stat(file)
                except OSError:  # removed since the listing: the next listing differs anyway
                    continue
                stamps[os.path.relpath(file, self.folder)] = (info.st_ino, info.st_mtime_ns, info.st_size)
        return stamps

    def stamp(self, key: str) -> tuple[Any, ...] | None:
        """(inode, mtime, size) of one file: different once it is rewritten; None if missing."""
        try:
            info = (self.folder / key).stat()
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def remove(self, mark: str) -> None:
        """Write file `mark`, move the folder aside to a hidden sibling in one rename (so its name is
        free at once and no listing sees half a store), then remove that."""
        if self.folder.is_dir():
            (self.folder / mark).touch()
        aside = self.folder.with_name(f"{ASIDE_PREFIX}{self.folder.name}-{uuid.uuid4().hex[:8]}")
        self.folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


@dataclass(frozen=True)
class BucketLocation:
    """A store under a prefix of an S3-compatible bucket: `s3://bucket/prefix`."""

    bucket: str
    prefix: str
    options: BucketOptions = BucketOptions()

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{BUCKET_SCHEME}{self.bucket}/{self.prefix}"

    @cached_property
    def _objects(self) -> S3Store:
        return S3Store(
            self.bucket,
            prefix=self.prefix,
            config=self.options.config(),  # type: ignore[arg-type]
            client_options={
                "connect_timeout": timedelta(seconds=self.options.connect_timeout),
                "read_timeout": timedelta(seconds=self.options.read_timeout),
                "timeout": REQUEST_TIMEOUT,
                "allow_http": bool(self.options.allow_http),
            },
            retry_config={"max_retries": RETRIES, "retry_timeout": RETRY_TIMEOUT},
        )

    def zarr_store(self) -> Store:
        return _NamingObjectStore(self._objects)

    def child(self, name: str) -> BucketLocation:
        return BucketLocation(self.bucket, f"{self.prefix}/{name}", self.options)

    def children(self) -> list[BucketLocation]:
        """The prefixes directly under this one, sorted by name."""
        listed = self._call(lambda: obstore.list_with_delimiter(self._objects, None))
        return [self.child(p.rstrip("/").rsplit("/", 1)[-1]) for p in sorted(listed["common_prefixes"])]

    def exists(self) -> bool:
        """Whether any object lies under the prefix."""
        return bool(self._call(lambda: next(iter(obstore.list(self._objects, chunk_size=1)), [])))

    def is_empty(self) -> bool:
        """Whether a new store may be created here: no object under the prefix. Also the check that
        the bucket answers, with the credentials given: a StoreError in one line if not."""
        return not self.exists()

    def has(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        """Remove object `key`; nothing if it is missing (S3 deletes are idempotent)."""
        self._call(lambda: obstore.delete(self._objects, key))

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self._call(lambda: obstore.get(self._objects, key).bytes()))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        self._call(lambda: obstore.put(self._objects, key, data))

    def size(self, key: str) -> int | None:
        stamp = self.stamp(key)
        return None if stamp is None else int(stamp[1])

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every object under `prefix`, keyed by its path relative to the store: one listing."""
        return {key: size for key, (_, size) in self.stamps(prefix).items()}

    def stamps(self, prefix: str = "") -> dict[str, tuple[str, int]]:
        """(ETag, size) of every object under `prefix`, keyed by its path relative to the store."""
        listed = self._call(lambda: obstore.list(self._objects, prefix or None).collect())
        return {str(o["path"]): (str(o["e_tag"]), int(o["size"])) for o in listed}

    def download(self, key: str, file: Path) -> None:
        """Stream object `key` into `file` (its folders made), never holding it whole in memory."""
        file.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> None:
            with file.open("wb") as out:
                for block in obstore.get(self._objects, key).stream():
                    out.write(block)

        self._call(fetch)

    def stamp(self, key: str) -> tuple[Any, ...] | None:
        """(ETag, size) of one object: different once it is rewritten; None if missing."""
        try:
            head = self._call(lambda: obstore.head(self._objects, key))
        except FileNotFoundError:
            return None
        return head["e_tag"], head["size"]

    def remove(self, mark: str) -> None:
        """Write object `mark`, delete `zarr.json` (from then on no listing shows a store here), then
        every other object under the prefix."""
        self.write(mark, b"")
        self._call(lambda: obstore.delete(self._objects, "zarr.json"))
        rest = [key for key in self.sizes() if key != mark]
        if rest:
            self._call(lambda: obstore.delete(self._objects, rest))
        self._call(lambda: obstore.delete(self._objects, mark))

    def _call(self, request: Any) -> Any:
        """Run one request; a backend failure other than a missing object becomes a one-line
        UnreachableStoreError."""
        try:
            return request()
        except FileNotFoundError:
            raise
        except InvalidPathError as error:  # a key such as `a/../b`: the bucket answered, with a bad key
            raise StoreError(
                f"{self}: holds an object whose key is not a plain path ({_first_line(error)}); rename or "
                "remove it"
            ) from error
        except ObjectStoreError as error:
            raise unreachable(str(self), error) from error


_CONNECTION_FAILURES = ("error sending request", "timed out", "connection refused", "connection reset")
"""How the backend's message says a request never got an answer (as opposed to an answer refusing it)."""


def unreachable(where: str, error: Exception) -> UnreachableStoreError:
    """The one-line error for a failed request to the object store holding `where` (a URL): it is
    unreachable (no answer: down, wrong endpoint, network), or it answered otherwise than expected
    (no such bucket, credentials refused)."""
    first = _first_line(error)
    if any(sign in str(error).lower() for sign in _CONNECTION_FAILURES):
        return UnreachableStoreError(
            f"{where}: the object store is unreachable ({first}); check that it is up and the endpoint "
            "(AWS_ENDPOINT_URL or RETRAC_S3_ENDPOINT_URL), then retry"
        )
    return UnreachableStoreError(
        f"{where}: the object store did not answer as expected ({first}); check the bucket, the endpoint "
        "(AWS_ENDPOINT_URL or RETRAC_S3_ENDPOINT_URL) and the credentials"
    )


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _naming(method: _Method) -> _Method:
    """`method` of zarr's obstore backend, raising `unreachable`'s error where the backend fails."""

    @functools.wraps(method)
    async def wrapped(self: _NamingObjectStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except ObjectStoreError as error:
            where = f"{BUCKET_SCHEME}{self.store.config.get('bucket')}/{self.store.prefix}"
            raise unreachable(where, error) from error

    return cast(_Method, wrapped)


def _first_line(error: Exception) -> str:
    """The backend's first line about `error` (its report goes on for many), at most 300 characters."""
    text = str(error)
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


class _NamingObjectStore(ObjectStore):
    """zarr's obstore backend, whose failed requests raise `unreachable`'s one-line error naming the
    store (`s3://bucket/prefix`) instead of the backend's many-line report: zarr reads and writes the
    arrays itself, outside `BucketLocation._call`."""

    get = _naming(ObjectStore.get)
    get_partial_values = _naming(ObjectStore.get_partial_values)
    exists = _naming(ObjectStore.exists)
    set = _naming(ObjectStore.set)
    delete = _naming(ObjectStore.delete)


Location = LocalLocation | BucketLocation


def locate(
    where: str | Path | Location,
    options: BucketOptions | None = None,
    *,
    environment: Mapping[str, str] | None = None,
) -> Location:
    """The location `where` names: an `s3://bucket/prefix` URL, or a local folder (made absolute).

    A URL is checked here, before anything is read or written: its form (a bucket name S3 accepts and
    a prefix of plain parts, no `..`), and that some credentials are set (`options`, else the AWS
    environment variables in `environment`, by default this process's). A StoreError in one line
    says what to fix.
    """
    if isinstance(where, (LocalLocation, BucketLocation)):
        return where
    text = str(where)
    if not text.startswith(BUCKET_SCHEME):
        if "://" in text:
            raise StoreError(f"{text!r}: only s3://BUCKET/PREFIX URLs and local folders can hold a store")
        return LocalLocation(Path(where).expanduser().resolve())
    bucket, prefix = parse_url(text)
    options = options or BucketOptions()
    environment = os.environ if environment is None else environment
    if not options.has_credentials(environment):
        raise StoreError(
            f"{text}: no credentials for the object store; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or RETRAC_S3_ACCESS_KEY_ID and RETRAC_S3_SECRET_ACCESS_KEY)"
        )
    if options.allow_http is None:  # given client options replace the backend's own reading of it
        allowed = environment.get("AWS_ALLOW_HTTP", "").strip().lower() in ("1", "true", "yes")
        options = replace(options, allow_http=allowed)
    return BucketLocation(bucket, prefix, options)


def parse_url(text: str) -> tuple[str, str]:
    """(bucket, prefix) of an `s3://bucket/prefix` URL, checked: a bucket name S3 accepts and a
    prefix of plain parts, no `..`. A StoreError in one line says what to fix."""
    bucket, _, prefix = text[len(BUCKET_SCHEME) :].partition("/")
    parts = prefix.strip("/").split("/") if prefix.strip("/") else []
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise StoreError(
            f"{text!r}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '.' and '-'); "
            "give s3://BUCKET/PREFIX"
        )
    if not parts or any(p in (".", "..") or not _PREFIX_PART.fullmatch(p) for p in parts):
        raise StoreError(
            f"{text!r}: give a prefix inside the bucket, of plain parts (letters, digits, '.', '_', "
            "'-'; no '..'), as s3://BUCKET/PREFIX"
        )
    return bucket, "/".join(parts)


STORE_SUFFIX = ".zarr"
"""The suffix a store's folder may carry (`retrac index create stores/example.zarr`); not part of its name."""


def index_name(location: Location) -> str:
    """An index's name, whichever way it was made: its folder's (or prefix's) name without `.zarr`."""
    return location.name.removesuffix(STORE_SUFFIX)
