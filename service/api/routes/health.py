"""Liveness and readiness probes (the compose file's healthcheck calls `/v1/health`)."""

from __future__ import annotations

import os
from importlib.metadata import version

from fastapi import APIRouter, Response

from api_schemas.common import CheckPublic, HealthPublic, ReadinessPublic
from service.deps import RepositoryDep
from service.queue import queue_check
from storage import LocalLocation, Location, UnreachableStoreError

router = APIRouter(tags=["health"])


VERSION = version("retrac")


@router.get("/health", summary="The process answers")
async def health() -> HealthPublic:
    """On the event loop, not the thread pool: it answers at once even while queries fill every
    worker thread (the compose healthcheck gives it 4 s)."""
    return HealthPublic(version=VERSION)


@router.get(
    "/ready",
    summary="The job queue answers and the stores root is readable",
    responses={503: {"model": ReadinessPublic, "description": "a dependency is not ready"}},
)
def ready(repository: RepositoryDep, response: Response) -> ReadinessPublic:
    checks = {"queue": queue_check(), "stores": _stores_check(repository.root)}
    answer = ReadinessPublic(ready=all(c.ok for c in checks.values()), checks=checks)
    if not answer.ready:
        response.status_code = 503
    return answer


def _stores_check(root: Location) -> CheckPublic:
    """A folder must be writable; a bucket must answer a listing of the stores' prefix (one request)."""
    if isinstance(root, LocalLocation):
        folder = root.folder
        usable = folder.is_dir() and os.access(folder, os.R_OK | os.W_OK | os.X_OK)
        return CheckPublic(
            ok=usable,
            detail="the stores root is writable" if usable else "the stores root is not a writable folder",
        )
    try:
        root.exists()
    except UnreachableStoreError as error:
        return CheckPublic(ok=False, detail=str(error))
    return CheckPublic(ok=True, detail=f"the object store holding {root} answers")
