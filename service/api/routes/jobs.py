"""Indexing jobs: start one for an index's pending shards, follow it, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from api_schemas.jobs import JobCreate, JobPublic
from service.deps import ReadAccess, RepositoryDep, WriteAccess
from service.handlers import ERROR_RESPONSES
from service.queue import cancel_job, describe_job, start_job

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9-]{1,64}$", description="the job's id")]


@router.post(
    "",
    summary="Index what is still pending in an index (resume after a cancel or a lost queue)",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[WriteAccess],
)
def create_job(body: JobCreate, repository: RepositoryDep) -> JobPublic:
    return describe_job(repository, start_job(repository, body.index))


@router.get("/{job_id}", summary="A job's state, progress and time left", dependencies=[ReadAccess])
def read_job(job_id: JobId, repository: RepositoryDep) -> JobPublic:
    return describe_job(repository, job_id)


@router.delete("/{job_id}", summary="Cancel a job", dependencies=[WriteAccess])
def delete_job(job_id: JobId, repository: RepositoryDep) -> JobPublic:
    return cancel_job(repository, job_id)
