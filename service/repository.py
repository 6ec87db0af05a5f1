"""The service's indexes: one gradient store per name under the stores root, opened once and kept
while its files stay the same (another API process may delete and recreate an index of that name).

Every path a client can influence is confined here: an index name becomes a folder directly under
the stores root, and the paths inside a new index's spec must lie under the models root (run,
checkpoints, scheduler) or the data root (dataset source). They are stored absolute, so the API and
the workers must see the models and data at the same paths (the compose file mounts them so).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

from api_schemas import CheckpointSpec, DatasetSpec, IndexSpec
from api_schemas.common import IndexName
from api_schemas.indexes import BrokenIndexPublic, CheckpointProgressPublic, IndexCreate, IndexPublic
from retrac.exceptions import RetracError
from retrac.paths import resolve_inside
from service.errors import Conflict, NotFound
from service.settings import Settings
from storage import GradientStore, OpenStores, delete_store, is_leftover
from storage.store import mark_deleted, remove_set_aside

logger = logging.getLogger(__name__)

JOBS_FOLDER = ".jobs"
"""Under the stores root: one small JSON file per index naming its indexing job (a hidden name, so
no index can be called that)."""


class StoreRepository:
    """Creates, opens, lists and deletes the stores of one stores root; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.stores_root
        self._stores = OpenStores()
        self._lock = threading.Lock()

    def path(self, name: IndexName) -> Path:
        """The folder of index `name`; an error if the name would leave the stores root."""
        path = resolve_inside(self.root, name)
        if path.parent != self.root:
            raise NotFound(f"no index {name!r}; index names are single folder names")
        return path

    def require(self, name: IndexName, *, or_leftover: bool = False) -> Path:
        """The folder of index `name`, which must hold a store, or with `or_leftover` what an
        interrupted deletion left of one (else NotFound)."""
        path = self.path(name)
        if not (or_leftover if is_leftover(path) else (path / "zarr.json").is_file()):
            raise NotFound(f"no index {name!r}; list the indexes with GET /v1/indexes")
        return path

    def names(self) -> list[str]:
        """Names of the stores under the root, sorted."""
        return [p.name for p in self._folders() if (p / "zarr.json").is_file() and not is_leftover(p)]

    def leftovers(self) -> list[str]:
        """Names of the folders that an interrupted deletion left (a killed process, a worker's last
        shard written after the delete), sorted: not stores, but their names are taken on disk."""
        return [p.name for p in self._folders() if is_leftover(p)]

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

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
        for name in self.names():
            try:
                described.append(self.describe(name))
            except NotFound:  # deleted meanwhile
                continue
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
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                store = GradientStore.create(path, spec, data_root=self.settings.data_root)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
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
            self._job_file(name).unlink(missing_ok=True)
            remove_set_aside(self.root)

    def mark_deleted(self, name: IndexName) -> None:
        """Mark index `name` as being deleted, so workers skip its shards from now on."""
        mark_deleted(self.require(name, or_leftover=True))

    def confine(self, spec: IndexSpec) -> IndexSpec:
        """`spec` with its paths resolved inside the models and data roots (SpecError if one leaves them)."""
        models = self.settings.models_root

        def inside_models(path: str | None) -> str | None:
            return None if path is None else str(resolve_inside(models, path))

        source = spec.dataset.source
        if not source.startswith("builtin:"):
            source = str(resolve_inside(self.settings.data_root, source))
        return spec.model_copy(
            update={
                "dataset": DatasetSpec.model_validate({**spec.dataset.model_dump(), "source": source}),
                "run": inside_models(spec.run),
                "scheduler": inside_models(spec.scheduler),
                "checkpoints": tuple(
                    CheckpointSpec.model_validate({**c.model_dump(), "path": inside_models(c.path)})
                    for c in spec.checkpoints
                ),
            }
        )

    # --- job records ----------------------------------------------------------------------------------------

    def record_job(self, name: IndexName, job_id: str) -> None:
        """Remember that `job_id` indexes `name` (a file beside the stores, so it survives restarts)."""
        file = self._job_file(name)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({"index": name, "job_id": job_id}))

    def job_of(self, name: IndexName) -> str | None:
        """The id of the job started with index `name`, if any."""
        file = self._job_file(name)
        return json.loads(file.read_text())["job_id"] if file.is_file() else None

    def index_of(self, job_id: str) -> str:
        """The index that job `job_id` builds."""
        folder = self.root / JOBS_FOLDER
        for file in folder.glob("*.json") if folder.is_dir() else ():
            record = json.loads(file.read_text())
            if record["job_id"] == job_id:
                return str(record["index"])
        raise NotFound(f"no job {job_id!r}; a job's id is in its index's description (GET /v1/indexes/NAME)")

    def _job_file(self, name: str) -> Path:
        return self.root / JOBS_FOLDER / f"{name}.json"
