"""`retrac serve`: run the attribution REST service (and its web page) under uvicorn.

Settings come from the environment (`RETRAC_STORES_ROOT`, `RETRAC_API_KEY`, ...; see
`service.settings`); the flags only choose where to listen and how many processes to run. Each
server process computes one query's gradients at a time, with `RETRAC_TORCH_THREADS` threads, or
hands them to a pool of `--query-pool N` processes (`RETRAC_QUERY_POOL`) that compute N at once;
docs/deployment.md says what served the most.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(
        "serve",
        help="Run the attribution REST service and web page.",
        short_help="run the attribution REST service and web page",
    )(serve)


def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="server processes")] = 1,
    query_pool: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="processes computing query gradients per server process (0: in the server process, one "
            "query at a time)",
            show_default="RETRAC_QUERY_POOL, else 0",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> int:
    import uvicorn
    from pydantic import ValidationError

    from retrac.exceptions import SpecError
    from service.settings import get_settings

    if query_pool is not None:  # the server processes read their settings from the environment
        os.environ["RETRAC_QUERY_POOL"] = str(query_pool)
    try:
        get_settings()  # refuse bad settings with one line, before uvicorn starts
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
        )
        raise SpecError(f"bad service settings in the environment: {problems}") from error
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
    )
    return 0
