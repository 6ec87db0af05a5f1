"""How errors become HTTP answers: every one is an `ErrorPublic` body with a message that says what to fix.

Named engine errors are the client's fault (bad image, bad spec, stale store) and become 4xx; anything
else is a bug, logged with its traceback and answered with a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from api_schemas.common import ErrorPublic
from api_schemas.errors import messages
from retrac.exceptions import CheckpointError, DatasetError, ReplayError, RetracError, SpecError
from service.exceptions import Conflict, NotFound, Unavailable
from service.repository import StoreRepository
from service.settings import Settings
from storage import (
    AnnIndexError,
    DamagedStoreError,
    IncompleteStoreError,
    StaleStoreError,
    StoreError,
    UnreachableStoreError,
)

BuildingAdvice = Callable[[StoreRepository, str], str]
"""What to tell a client about an index still being built (`service.queue.still_building`)."""

logger = logging.getLogger(__name__)


STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
    (StaleStoreError, 409),
    (IncompleteStoreError, 409),
    (DamagedStoreError, 409),
    (AnnIndexError, 409),
    (UnreachableStoreError, 503),
    (StoreError, 422),
    (DatasetError, 422),
    (SpecError, 422),
    (CheckpointError, 422),
    (ReplayError, 422),
    (RetracError, 400),
)
"""HTTP status of each named error of the service and the engine, most specific first."""

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorPublic, "description": text}
    for code, text in (
        (400, "the request cannot be carried out as sent"),
        (401, "the API key is missing"),
        (403, "the API key is wrong"),
        (404, "no such index, job or sample"),
        (
            409,
            "the index is not ready for this (still building, stale, damaged, no ANN index, or already "
            "exists)",
        ),
        (413, "the request body is too large"),
        (422, "a field, image or spec is invalid"),
        (503, "a dependency (the job queue, the object store holding the indexes) is unreachable"),
    )
}
"""Error responses declared on every route, so the OpenAPI schema lists them."""


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorPublic(detail=detail).model_dump(), status_code=status, headers=headers)


async def _named_error(request: Request, error: Exception) -> JSONResponse:
    status = next(code for kind, code in STATUS if isinstance(error, kind))
    return _answer(status, without_server_paths(str(error), request.app.state.settings))


def without_server_paths(message: str, settings: Settings) -> str:
    """`message` with the service's root folders cut off, so a path reads as the client names it
    (relative to its root) and no server folder is revealed. Roots in a bucket stay whole: they name
    the store or input a message is about (an unreachable one, say), and are no server folder."""
    folders = (settings.stores_root, settings.models_root, settings.data_root)
    roots = sorted((str(r) for r in folders if isinstance(r, Path)), key=len)  # a bucket URL names the store
    for root in reversed(roots):  # the longest first, in case one root lies inside another
        message = message.replace(f"{root}/", "").replace(root, ".")
    return message


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    detail = str(error.detail)
    if error.status_code == 404 and detail == "Not Found":  # no route or file: say where the routes are
        detail = f"no such path {request.url.path!r}; the API is described at /docs"
    elif error.status_code == 405:
        allowed = _allowed_methods(request, error)
        detail = (
            f"{request.method} is not allowed on {request.url.path!r}; use {allowed} "
            "(the API is described at /docs)"
        )
        return _answer(405, detail, {"Allow": allowed})
    return _answer(error.status_code, detail, getattr(error, "headers", None))


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request, error: HTTPException) -> str:
    """Every method some API route takes at the request's path: a path may have one route per method
    (GET and POST /v1/indexes), and the route that raised the 405 names only its own. Mounted file
    servers (the web page) take any path, so they are left out and name their own methods."""
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    allowed = [
        method
        for method in METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed) or (error.headers or {}).get("Allow", "")


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    items = error.errors()
    for item in items:
        if item.get("type") == "json_invalid":
            reason = item.get("ctx", {}).get("error", "cannot parse")
            return _answer(422, f"invalid request: the body is not valid JSON ({reason})")
    return _answer(422, "invalid request: " + "; ".join(messages(items)))


def _incomplete_store(
    advice: BuildingAdvice,
) -> Callable[[Request, IncompleteStoreError], Awaitable[JSONResponse]]:
    """The handler of IncompleteStoreError: the store's own message tells a command-line user what to
    run; an API client is told by `advice(repository, name)` whether to wait for a job or start one."""

    async def handler(request: Request, error: IncompleteStoreError) -> JSONResponse:
        name = request.path_params.get("name")
        if name is None:
            return await _named_error(request, error)
        return _answer(409, await run_in_threadpool(advice, request.app.state.repository, name))

    return handler


REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_SCOPE = "retrac.request_id"
"""Where `service.requests` leaves a request's id in its scope: a bug's answer is sent outside that
middleware, so it adds the header itself."""


async def _bug(request: Request, error: Exception) -> JSONResponse:
    rid = request.scope.get(REQUEST_ID_SCOPE)
    logger.exception(
        "unhandled error in %s %s",
        request.method,
        request.url.path,
        exc_info=error,
        extra={"request_id": rid},
    )
    return _answer(500, "internal error; the service logged it", {REQUEST_ID_HEADER: rid} if rid else None)


def install_error_handlers(app: FastAPI, building_advice: BuildingAdvice) -> None:
    """Every error becomes an `ErrorPublic` answer; `building_advice(repository, name)` says what to do
    about an index still being built (`service.queue.still_building`: the job queue is not known here)."""
    for kind in (NotFound, Conflict, Unavailable, RetracError):
        app.add_exception_handler(kind, _named_error)
    handler = _incomplete_store(building_advice)
    app.add_exception_handler(IncompleteStoreError, handler)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _bug)
