"""Creating and deleting an index, with its job: the steps the routes take, in the order that keeps
the stores and the queue consistent whatever fails on the way."""

from __future__ import annotations

from api_schemas.common import IndexName
from api_schemas.indexes import IndexCreate, IndexPublic
from service.queue import cancel_index_job, require_queue, start_job
from service.repository import StoreRepository


def create_index(repository: StoreRepository, request: IndexCreate) -> IndexPublic:
    """Create the store and start its job; if the job cannot start, the store is removed again."""
    repository.check_new(request)  # a bad request is told so, whether or not the queue is up
    require_queue()  # before the store is written: an index nobody fills would only mislead
    store = repository.create(request)
    try:
        start_job(repository, request.name)
    except BaseException:
        repository.delete(request.name)
        raise
    return repository.describe(request.name).model_copy(update={"notices": list(store.plan.dataset.notices)})


def delete_index(repository: StoreRepository, name: IndexName) -> None:
    """Delete an index while its job may run: mark it (workers skip it from then on), cancel the job
    (queued shards are dropped), then remove the store and its job record."""
    repository.mark_deleted(name)
    cancel_index_job(repository, name)
    repository.delete(name)
