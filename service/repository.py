"""The service's indexes: one gradient store per name under the stores root, opened once and kept
while its files stay the same (another API process may delete and recreate an index of that name).

The stores root is a folder or a prefix in an S3-compatible bucket (`storage.location`): the index
stores and the job records live there alike, so API processes and workers on other machines share
nothing but the queue's Redis and the bucket.

Every path a client can influence is confined here: an index name becomes a folder (or prefix) directly
under the stores root, and the paths inside a new index's spec must lie under the models root (run,
checkpoints, scheduler, VAE) or the data root (dataset source), folders or bucket URLs. They are stored
absolute, so the API and the workers must see the models and data at the same paths (the compose file
mounts them so) or reach the same bucket. A models root that is a folder is recorded in the store too:
the parts found beside a checkpoint (`scheduler/`, `vae/`, `text_encoder/`, `tokenizer/`) and every
model file must resolve inside it, links followed, at create and whenever the store is reopened.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from api_schemas import IndexSpec
from api_schemas.common import IndexName
from api_schemas.indexes import (
    BrokenIndexPublic,
    CheckpointProgressPublic,
    IndexCreate,
    IndexPublic,
    ParametersPublic,
)
from api_schemas.specs import default_estimator
from retrac.defaults import MEASURED_ORDER
from retrac.exceptions import RetracError, SpecError
from retrac.methods import methods_served
from retrac.paths import resolve_inside
from service.exceptions import Conflict, NotFound
from service.settings import Settings
from storage import (
    GradientStore,
    LocalLocation,
    Location,
    OpenStores,
    UnreachableStoreError,
    delete_store,
    is_leftover,
)
from storage.inputs import is_url
from storage.location import STORE_SUFFIX, index_name, parse_url
from storage.store import DELETED_MARK, mark_deleted, remove_set_aside

logger = logging.getLogger(__name__)

JOBS_FOLDER = ".jobs"
"""Under the stores root: one small JSON file per index naming its indexing job (a hidden name, so
no index can be called that)."""


class StoreRepository:
    """Creates, opens, lists and deletes the stores of one stores root; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root: Location = settings.stores_location()
        self._stores = OpenStores(settings.bucket_options())
        self._lock = threading.Lock()

    @property
    def open_stores(self) -> OpenStores:
        """The stores this repository keeps opened (for the metrics of their cache)."""
        return self._stores

    def path(self, name: IndexName) -> Location:
        """Where index `name` lives (its folder or prefix); an error if the name would leave the root.

        A store made by `retrac index create stores/NAME.zarr` is index NAME, as one made through the
        API: NAME is its folder when that exists or no `NAME.zarr` does, else `NAME.zarr`."""
        plain = self._child(name)
        if name.endswith(STORE_SUFFIX) or plain.exists():
            return plain
        suffixed = self._child(name + STORE_SUFFIX)
        return suffixed if suffixed.exists() else plain

    def _child(self, folder: str) -> Location:
        if folder.startswith(".") or "/" in folder or "\\" in folder:
            raise NotFound(f"no index {folder!r}; index names are single folder names")
        if isinstance(self.root, LocalLocation):
            resolved = resolve_inside(self.root.folder, folder)
            if resolved.parent != self.root.folder:
                raise NotFound(f"no index {folder!r}; index names are single folder names")
            return LocalLocation(resolved)
        return self.root.child(folder)

    def require(self, name: IndexName, *, or_leftover: bool = False) -> Location:
        """Where index `name` lives, which must hold a store, or with `or_leftover` what an
        interrupted deletion left of one (else NotFound)."""
        path = self.path(name)
        if not (or_leftover if is_leftover(path) else path.has("zarr.json")):
            raise NotFound(f"no index {name!r}; list the indexes with GET /v1/indexes")
        return path

    def names(self) -> list[str]:
        """Names of the stores under the root, sorted."""
        stores = [p for p in self._children() if p.has("zarr.json") and not p.has(DELETED_MARK)]
        return sorted({index_name(p) for p in stores})

    def shadowed(self) -> list[str]:
        """Folders `NAME.zarr` beside a folder `NAME`: both would be index NAME, which is the latter."""
        folders = {p.name for p in self._children()}
        suffixed = (f for f in folders if f.endswith(STORE_SUFFIX))
        return sorted(f for f in suffixed if f.removesuffix(STORE_SUFFIX) in folders)

    def leftovers(self) -> list[str]:
        """Names of the folders that an interrupted deletion left (a killed process, a worker's last
        shard written after the delete), sorted: not stores, but their names are taken on disk."""
        return sorted({index_name(p) for p in self._children() if is_leftover(p)})

    def _children(self) -> list[Location]:
        """The folders (or prefixes) directly under the root, hidden ones (job records) left out."""
        return [child for child in self.root.children() if not child.name.startswith(".")]

    def open(self, name: IndexName) -> GradientStore:
        """The opened store of `name`: checked against its inputs when first opened, and opened and
        checked again when its group or checkpoint files have changed since."""
        return self._stores.get(self.require(name))

    def describe(self, name: IndexName) -> IndexPublic:
        """What the API shows of index `name`: spec, size, per-checkpoint progress, job."""
        store = self.open(name)
        status = store.status()
        info = store.checkpoint_info
        return IndexPublic(
            name=name,
            spec=store.spec,
            num_samples=store.num_rows,
            num_checkpoints=store.num_checkpoints,
            num_slots=store.num_slots,
            dim=store.dim,
            resolution=store.spec.dataset.resolution,
            channels=store.spec.dataset.channels,
            classes=store.classes.to_json() if store.classes is not None else None,
            text_conditional=store.text_conditional,
            parameters=_parameters(store.attrs.get("parameters")),
            methods=[m for m in MEASURED_ORDER if m in methods_served(store.spec)],
            estimator=default_estimator(store.spec.slots, "exact", knobs_given=False),
            size_bytes=store.size_bytes(),
            complete=status.complete,
            progress=[
                CheckpointProgressPublic(
                    checkpoint=c.checkpoint,
                    epoch=info[c.checkpoint]["epoch"],
                    weight=info[c.checkpoint]["weight"],
                    done=c.done_rows,
                    total=c.total_rows,
                    complete=c.complete,
                )
                for c in status.checkpoints
            ],
            job_id=self.job_of(name),
        )

    def describe_all(self) -> tuple[list[IndexPublic], list[BrokenIndexPublic]]:
        """Every index that opens, and every one that does not (stale, damaged, half deleted) with the
        reason: one broken store never hides the others."""
        described, broken = [], []
        for name in self.leftovers():
            removal = f"DELETE /v1/indexes/{name} removes it"
            reason = f"not a whole store (what an interrupted deletion leaves); {removal}"
            broken.append(BrokenIndexPublic(name=name, reason=reason))
        for folder in self.shadowed():
            hidden = f"folder {folder} is hidden by the index of the same name without {STORE_SUFFIX}"
            reason = f"{hidden}; rename the folder"
            broken.append(BrokenIndexPublic(name=folder, reason=reason))
        for name in self.names():
            try:
                described.append(self.describe(name))
            except NotFound:  # deleted meanwhile
                continue
            except UnreachableStoreError:  # the whole root is out of reach: no index is broken, all wait
                raise
            except Exception as error:  # anything, even a bug: the list of the others must answer
                logger.warning("index %s listed as broken: %s", name, error)
                reason = str(error) if isinstance(error, RetracError) else "it does not open; delete it"
                broken.append(BrokenIndexPublic(name=name, reason=reason))
        return described, sorted(broken, key=lambda b: b.name)

    def check_new(self, request: IndexCreate) -> IndexSpec:
        """The spec of a new index with its paths confined; a Conflict if the name is taken."""
        path = self.path(request.name)
        if is_leftover(path):  # what an interrupted delete left: no store, so the name is free
            delete_store(path)
        if path.exists():
            raise Conflict(f"index {request.name!r} exists already; choose another name or delete it first")
        return self.confine(request.spec)

    def create(self, request: IndexCreate) -> GradientStore:
        """A new, empty store for `request` (its spec's paths confined and made absolute)."""
        with self._lock:
            remove_set_aside(self.root)
            spec = self.check_new(request)
            path = self.path(request.name)
            try:
                # At a URL, `confine` kept the paths inside the root. A folder root is recorded in the
                # store, so the parts found beside the checkpoints stay inside it whenever it is reopened.
                models, data = self.settings.models_root, self.settings.data_root
                store = GradientStore.create(
                    path,
                    spec,
                    root=models if isinstance(models, Path) else None,
                    data_root=data if isinstance(data, Path) else None,
                )
            except BaseException:
                if path.exists():  # a store half written, or an empty folder
                    delete_store(path)
                raise
            self._stores.put(store)
            return store

    def delete(self, name: IndexName) -> None:
        """Remove the store of `name`, or what an interrupted deletion left of it, and its job record
        (`storage.delete_store`: safe while workers write it); then finish any deletion killed after
        its rename."""
        with self._lock:
            path = self.require(name, or_leftover=True)
            self._stores.forget(path)
            delete_store(path)
            self._jobs().delete(self._job_key(name))
            remove_set_aside(self.root)

    def mark_deleted(self, name: IndexName) -> None:
        """Mark index `name` as being deleted, so workers skip its shards from now on."""
        mark_deleted(self.require(name, or_leftover=True))

    def confine(self, spec: IndexSpec) -> IndexSpec:
        """`spec` with its paths resolved inside the models and data roots (SpecError if one leaves them)."""
        models, data = self.settings.models_root, self.settings.data_root
        return spec.map_paths(lambda path: _inside(models, path), lambda path: _inside(data, path))

    # --- job records ----------------------------------------------------------------------------------------

    def record_job(self, name: IndexName, job_id: str) -> None:
        """Remember that `job_id` indexes `name` (a small object beside the stores, so it survives
        restarts and every API process sees it)."""
        self._jobs().write(self._job_key(name), json.dumps({"index": name, "job_id": job_id}).encode())

    def job_of(self, name: IndexName) -> str | None:
        """The id of the job started with index `name`, if any."""
        record = self._jobs().read(self._job_key(name))
        return json.loads(record)["job_id"] if record is not None else None

    def index_of(self, job_id: str) -> str:
        """The index that job `job_id` builds."""
        jobs = self._jobs()
        for key in sorted(jobs.sizes()) if jobs.exists() else ():
            record = jobs.read(key)
            if key.endswith(".json") and record is not None and json.loads(record)["job_id"] == job_id:
                return str(json.loads(record)["index"])
        raise NotFound(f"no job {job_id!r}; a job's id is in its index's description (GET /v1/indexes/NAME)")

    def _jobs(self) -> Location:
        return self.root.child(JOBS_FOLDER)

    @staticmethod
    def _job_key(name: str) -> str:
        return f"{name}.json"


def _inside(root: Path | str, path: str) -> str:
    """`path` resolved inside `root`: a folder (`resolve_inside`: no `..`, no link out), or a bucket
    URL, under which a relative path is joined and an absolute URL must lie. A SpecError if it leaves."""
    if isinstance(root, Path):
        if is_url(path):
            raise SpecError(
                f"{path!r}: this service reads its inputs from folders; give a path inside its root"
            )
        return str(resolve_inside(root, path))
    url = path if is_url(path) else f"{root}/{path}"
    if not url.startswith(f"{root}/") or any(part in ("", ".", "..") for part in url.split("/")[3:]):
        where = path if is_url(path) else Path(path).name
        raise SpecError(f"path {where!r} leaves the configured root; give a path inside it (no '..')")
    parse_url(url)  # the rest of its form: plain parts
    return url


def _parameters(described: dict[str, Any] | None) -> ParametersPublic | None:
    """What the API shows of the parameters a store's gradients are over (its base by the spec's path,
    not the store's resolved one); None for stores from before they were recorded."""
    if described is None:
        return None
    return ParametersPublic(
        count=described["count"], patterns=described["patterns"], adapters=described["adapters"]
    )
