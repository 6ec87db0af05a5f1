"""A bound on request bodies, enforced while they stream in, before any route parses them.

Starlette spools a whole multipart body to disk before a route sees it, so the size check cannot
live in the route: this middleware refuses a declared `Content-Length` over the limit at once, and
stops a body without one (chunked) as soon as it passes the limit by raising a 413 `HTTPException`
from `receive`, which FastAPI's body parsing passes on to the app's error handler.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _detail(max_bytes: int) -> str:
    return f"request body too large; send at most {max_bytes} bytes (fewer or smaller images)"


class BodyLimit:
    """ASGI middleware: a 413 for any request whose body exceeds `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            body = json.dumps({"detail": _detail(self.max_bytes)}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _detail(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)
