"""Indexes: list, describe, create (which starts the indexing job), delete."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api_schemas.indexes import IndexCreate, IndexesPublic, IndexPublic
from service.deps import IndexNameDep, ReadAccess, RepositoryDep, WriteAccess
from service.errors import ERROR_RESPONSES
from service.queue import cancel_index_job, require_queue, start_job

router = APIRouter(prefix="/indexes", tags=["indexes"], responses=ERROR_RESPONSES)


@router.get("", summary="Every index", dependencies=[ReadAccess])
def list_indexes(repository: RepositoryDep) -> IndexesPublic:
    data = repository.describe_all()
    return IndexesPublic(data=data, count=len(data))


@router.get("/{name}", summary="One index: spec, size, indexing progress", dependencies=[ReadAccess])
def describe_index(name: IndexNameDep, repository: RepositoryDep) -> IndexPublic:
    return repository.describe(name)


@router.post(
    "",
    summary="Create an index and start its indexing job",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[WriteAccess],
)
def create_index(body: IndexCreate, repository: RepositoryDep) -> IndexPublic:
    repository.check_new(body)  # a bad request is told so, whether or not the queue is up
    require_queue()  # before the store is written: an index nobody fills would only mislead
    repository.create(body)
    try:
        start_job(repository, body.name)
    except BaseException:
        repository.delete(body.name)
        raise
    return repository.describe(body.name)


@router.delete(
    "/{name}",
    summary="Delete an index (its job is cancelled first)",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAccess],
)
def delete_index(name: IndexNameDep, repository: RepositoryDep) -> Response:
    repository.require(name)
    cancel_index_job(repository, name)
    repository.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
