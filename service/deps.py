"""Typed dependencies of the routes: settings, the store repository, the query engine (model cache), API keys.

The objects live on `app.state` (built once by `service.main.create_app`), so tests can build apps
with their own settings side by side.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyHeader

from api_schemas.common import IndexName
from service.query_engine import QueryEngine
from service.repository import StoreRepository
from service.settings import Settings
from storage import GradientStore

API_KEY_HEADER = "X-API-Key"

WRITE_SCHEME = "APIKey"
READ_SCHEME = "APIKeyForReads"
"""Security scheme names of the two guards (one header): the OpenAPI schema keeps the read guard's
only when reads need the key (`service.openapi`)."""

_write_key = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name=WRITE_SCHEME, auto_error=False, description="the service's API key"
)
_read_key = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name=READ_SCHEME, auto_error=False, description="the service's API key"
)


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _repository(request: Request) -> StoreRepository:
    return request.app.state.repository


def _engine(request: Request) -> QueryEngine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(_settings)]
RepositoryDep = Annotated[StoreRepository, Depends(_repository)]
EngineDep = Annotated[QueryEngine, Depends(_engine)]
"""The process's model cache, behind the lock that lets one query at a time use it."""
IndexNameDep = Annotated[IndexName, Path(description="the index's name")]


def _store(name: IndexNameDep, repository: RepositoryDep) -> GradientStore:
    return repository.open(name)


StoreDep = Annotated[GradientStore, Depends(_store)]
"""The opened store of the path's `{name}`: 404 if there is none, 409 if it is stale."""


def _check_key(settings: Settings, sent: str | None) -> None:
    if settings.api_key is None:
        return
    if not sent:
        raise HTTPException(
            401,
            f"this request needs the API key: send it in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )
    if not secrets.compare_digest(sent.encode(), settings.api_key.get_secret_value().encode()):
        raise HTTPException(
            403, f"wrong API key in the {API_KEY_HEADER} header; ask the operator for the right one"
        )


def require_key(settings: SettingsDep, sent: Annotated[str | None, Security(_write_key)]) -> None:
    """Guards every mutating request when an API key is configured."""
    _check_key(settings, sent)


def require_query_key(settings: SettingsDep, sent: Annotated[str | None, Security(_read_key)]) -> None:
    """Guards queries and reads too, when the settings say so (`protect_queries`)."""
    if settings.protect_queries:
        _check_key(settings, sent)


WriteAccess = Depends(require_key)
ReadAccess = Depends(require_query_key)
