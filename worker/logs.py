"""Log lines of the service and the workers: plain text (the default) or one JSON object per line.

`RETRAC_LOG_FORMAT=json` makes `configure` send every record to stderr as a JSON object with
`timestamp` (UTC, ISO 8601), `level`, `logger`, `message`, and whichever of `request_id`, `method`,
`path`, `status`, `duration_s`, `index`, `job`, `task` the record or the current context holds.
A request's id, index and job are set once per request or task (`bind`) and appear on every record
logged inside it, whichever module logs it, also in text mode through `ContextFilter`'s attributes.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

CONTEXT_FIELDS = ("request_id", "index", "job", "task")
"""What `bind` sets for the records logged inside a request or a task (`task`: a Celery task's id)."""
RECORD_FIELDS = ("method", "path", "status", "duration_s")
"""What a record may carry in its `extra`, written when present."""

_context: ContextVar[dict[str, str]] = ContextVar("retrac_log_context", default={})  # noqa: B039 - never mutated


def current(field: str) -> str | None:
    """The bound value of `field` (one of `CONTEXT_FIELDS`) in this context, if any."""
    return _context.get().get(field)


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Records logged inside the block carry `fields` (those not None) besides the ones bound already."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the bound fields on every record (`-` when unbound), so a text format may name them."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get()
        for field in CONTEXT_FIELDS:
            if not hasattr(record, field):
                setattr(record, field, bound.get(field, "-"))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in (*CONTEXT_FIELDS, *RECORD_FIELDS):
            value = getattr(record, field, None)
            if value is None:
                value = current(field) if field in CONTEXT_FIELDS else None
            if value is not None and value != "-":
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def json_handler() -> logging.Handler:
    """A stderr handler writing `JsonFormatter` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure(log_format: LogFormat, *, level: int = logging.INFO, quiet: tuple[str, ...] = ()) -> None:
    """In json mode, every logger writes through one `json_handler` on the root logger: the handlers
    others installed (uvicorn's, Celery's) are removed and their loggers propagate to it; the loggers
    named in `quiet` are silenced (their lines are written by someone else, e.g. the access log). In
    text mode nothing changes but that the bound fields are put on records."""
    if log_format == "text":
        for handler in logging.getLogger().handlers:
            handler.addFilter(ContextFilter())
        return
    root = logging.getLogger()
    root.handlers[:] = [json_handler()]
    root.setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        logger = logging.getLogger(name)
        if logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
    for name in quiet:
        logging.getLogger(name).disabled = True
