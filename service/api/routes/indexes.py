"""Indexes: list, describe, create (which starts the indexing job), delete."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api_schemas.indexes import IndexCreate, IndexesPublic, IndexPublic
from service import indexes
from service.deps import IndexNameDep, ReadAccess, RepositoryDep, WriteAccess
from service.handlers import ERROR_RESPONSES

router = APIRouter(prefix="/indexes", tags=["indexes"], responses=ERROR_RESPONSES)


@router.get("", summary="Every index", dependencies=[ReadAccess])
def list_indexes(repository: RepositoryDep) -> IndexesPublic:
    data, broken = repository.describe_all()
    return IndexesPublic(data=data, count=len(data), broken=broken)


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
    return indexes.create_index(repository, body)


@router.delete(
    "/{name}",
    summary="Delete an index (its job is cancelled first)",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAccess],
)
def delete_index(name: IndexNameDep, repository: RepositoryDep) -> Response:
    indexes.delete_index(repository, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
