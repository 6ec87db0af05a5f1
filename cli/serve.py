"""`retrac serve`: run the attribution REST service (and its web page) under uvicorn.

Settings come from the environment (`RETRAC_STORES_ROOT`, `RETRAC_API_KEY`, ...; see
`service.settings`); the flags only choose where to listen and how many processes to run. Each
process answers one query at a time, so `--workers` is how one machine serves queries in parallel.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the attribution REST service and web page")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from retrac.exceptions import SpecError
    from service.settings import get_settings

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
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )
    return 0
