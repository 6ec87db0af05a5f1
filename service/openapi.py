"""The OpenAPI schema as this app's settings make it: the API key is declared on exactly the
operations that need it, so generated clients and the docs page ask for it only there.

The routes declare two guards on one header (`service.deps`): writes need the key whenever one is
configured, reads only when `protect_queries` is set too. FastAPI declares both on every guarded
operation regardless of settings, so the schema is rewritten once: a needed guard becomes the one
`APIKey` scheme, an unneeded one is dropped.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.deps import READ_SCHEME, WRITE_SCHEME
from service.settings import Settings


def install_schema(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` (and `/openapi.json`) return the schema for `settings`."""
    generate = app.openapi  # FastAPI's own, which caches its schema: rewriting it again changes nothing

    def schema() -> dict[str, Any]:
        return _declare_key_where_needed(generate(), settings)

    app.openapi = schema  # type: ignore[method-assign]


def _declare_key_where_needed(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    needed = {
        WRITE_SCHEME: settings.api_key is not None,
        READ_SCHEME: settings.api_key is not None and settings.protect_queries,
    }
    used = False
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            kept: list[dict[str, list[str]]] = [
                {WRITE_SCHEME: []}
                for requirement in operation.pop("security", [])
                if any(needed.get(scheme, True) for scheme in requirement)
            ]
            if kept:
                operation["security"] = kept[:1]
                used = True
    schemes = schema.get("components", {}).get("securitySchemes", {})
    schemes.pop(READ_SCHEME, None)
    if not used:
        schemes.pop(WRITE_SCHEME, None)
    return schema
