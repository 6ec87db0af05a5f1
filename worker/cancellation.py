"""Cancelled jobs, remembered in the result backend so that every worker (also one started after the
cancel, which missed the revoke broadcast) skips their remaining tasks."""

from __future__ import annotations

from worker.app import app

_PREFIX = "retrac-cancelled-"


def mark_cancelled(job_id: str) -> None:
    app.backend.set(_PREFIX + job_id, "1")


def is_cancelled(job_id: str) -> bool:
    return app.backend.get(_PREFIX + job_id) is not None
