"""Liveness and readiness probes (the compose file's healthcheck calls `/v1/health`)."""

from __future__ import annotations

import os
from importlib.metadata import version

from fastapi import APIRouter, Response

from api_schemas.common import CheckPublic, HealthPublic, ReadinessPublic
from service.deps import SettingsDep
from service.queue import queue_check

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
def ready(settings: SettingsDep, response: Response) -> ReadinessPublic:
    root = settings.stores_root
    usable = root.is_dir() and os.access(root, os.R_OK | os.W_OK | os.X_OK)
    checks = {
        "queue": queue_check(),
        "stores": CheckPublic(
            ok=usable, detail="the stores root is writable" if usable else "the stores root is not a writable folder"
        ),
    }
    answer = ReadinessPublic(ready=all(c.ok for c in checks.values()), checks=checks)
    if not answer.ready:
        response.status_code = 503
    return answer
