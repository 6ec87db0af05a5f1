"""`RequestObserver`: every HTTP request's id, duration metric and access log line.

The id is the client's `X-Request-ID` when it is 1 to `MAX_ID_LENGTH` characters of letters, digits
and `._:-` (a tracing system's id), else a new random one (an unusable header is replaced, never
echoed); it is returned in `X-Request-ID` on every answer, errors included, bound to the request's
log records (`worker.logs.bind`) and carried into the job a request creates (`service.queue`). The
access line (logger `retrac.access`: method, path, status, duration, index) is written by the json
log format; the text format keeps uvicorn's own access lines.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.main import API_PREFIX
from service.handlers import REQUEST_ID_HEADER as HEADER
from service.handlers import REQUEST_ID_SCOPE
from service.metrics import ServiceMetrics
from worker.logs import bind

MAX_ID_LENGTH = 128
_USABLE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_LENGTH}}}")
UNMATCHED = "<unmatched>"
"""The route label of a request no route took (a 404), so unknown paths add no label values."""

access_log = logging.getLogger("retrac.access")


def request_id(sent: str | None) -> str:
    """The id of a request that sent header value `sent`: it, if usable, else a new one."""
    if sent is not None and _USABLE_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The path template of the route that took the request (`/v1/jobs/{job_id}`), `/` for the web
    page, `UNMATCHED` if none did."""
    route = scope.get("route")
    if route is None:
        return "/" if scope.get("endpoint") is not None else UNMATCHED
    template: str = getattr(route, "path", None) or "/"
    if scope["path"].startswith(f"{API_PREFIX}/") and not template.startswith(f"{API_PREFIX}/"):
        template = API_PREFIX + template  # FastAPI may keep the router's own route, without the prefix
    return template


class RequestObserver:
    """Pure ASGI middleware (outermost): ids, times and logs every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        rid = scope[REQUEST_ID_SCOPE] = request_id(sent.get(HEADER.lower()))
        started, status = time.perf_counter(), 500

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        with bind(request_id=rid):
            try:
                await self.app(scope, receive, answer)
            finally:
                self._observe(scope, status, time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_template(scope)
        self.metrics.requests.labels(scope["method"], route, str(status)).observe(seconds)
        index = scope.get("path_params", {}).get("name")
        access_log.info(
            "%s %s %d %.3f s",
            scope["method"],
            scope["path"],
            status,
            seconds,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_s": round(seconds, 6),
                "index": index,
            },
        )
