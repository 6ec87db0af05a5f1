"""Builds the FastAPI app: the /v1 API, the web page at `/`, error handlers, body limit, CORS.

`/docs` (Swagger UI) and `/redoc` load their scripts from the app itself (fastapi-offline ships
them), so the docs work on machines without internet access.

`GET /metrics` serves Prometheus metrics (`service.metrics`); every answer carries an `X-Request-ID`
(`service.requests`); `RETRAC_LOG_FORMAT=json` writes JSON log lines (`worker.logs`).

`retrac serve` runs `create_app` under uvicorn (as a factory, so settings are read at start, not at
import). Tests build apps with their own `Settings`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

import torch
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import Match, Mount
from starlette.types import Scope

from service.api.main import API_PREFIX, api_router
from service.handlers import install_error_handlers
from service.limits import BodyLimit
from service.metrics import ServiceMetrics
from service.openapi import install_schema
from service.query_engine import QueryEngine
from service.query_pool import QueryPool
from service.queue import still_building
from service.repository import StoreRepository
from service.requests import RequestObserver
from service.settings import Settings, get_settings
from worker import logs

STATIC = Path(__file__).parent / "static"


class WebPage(Mount):
    """The web page's files at `/`, for every path outside the API. A request to an API path never
    reaches them, so a wrong method there gets the API's 405 (with the route's `Allow`) and an unknown
    API path the API's 404, not the file server's answer."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if path == API_PREFIX or path.startswith(f"{API_PREFIX}/"):
            return Match.NONE, {}
        return super().matches(scope)


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operation id: its function's name (`attribute`, `list_indexes`, ...), short and
    stable, so generated clients name their calls after it."""
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app serving the stores under `settings.stores_root` (default settings: the environment's)."""
    settings = settings or get_settings()
    logs.configure(settings.log_format, quiet=("uvicorn.access",))  # json: `RequestObserver` logs access
    torch.set_num_threads(settings.torch_threads)
    pool = QueryPool(settings.query_pool, settings) if settings.query_pool else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """The query pool's processes live as long as the server: started before the first request,
        stopped at shutdown."""
        if pool is not None:
            pool.start()
        try:
            yield
        finally:
            if pool is not None:
                pool.close()

    app = FastAPIOffline(
        title="retrac",
        version=version("retrac"),
        summary="Data attribution for diffusion models: Diffusion-TracIn and Diffusion-ReTrac over HTTP.",
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_url="/openapi.json",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    settings.use_input_cache()
    app.state.repository = StoreRepository(settings)
    metrics = app.state.metrics = ServiceMetrics(app.state.repository.open_stores, pool)
    app.state.engine = QueryEngine(
        settings.gradient_computers(),
        pool,
        on_answer=metrics.observe_query,
    )
    install_error_handlers(app, still_building)
    install_schema(app, settings)
    app.include_router(api_router)
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    app.router.routes.append(WebPage("/", app=StaticFiles(directory=STATIC, html=True), name="web"))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestObserver, metrics=metrics)  # outermost: it sees every answer
    return app


def _metrics(request: Request) -> Response:
    """Prometheus's text format of `service.metrics`."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
