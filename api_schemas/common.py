"""Shapes shared by every resource of the HTTP API: errors, health, and the names clients send.

Names (index names, sample ids) are constrained here, in the contract, so that a client learns the
rule from the OpenAPI schema and the service never turns an unchecked string into a path.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

IndexName = Annotated[
    str,
    StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    Field(description="1-64 characters: letters, digits, '.', '_', '-'; starts with a letter or digit"),
]
"""The name of an index, also its folder under the stores root: it cannot hold '/' or start with '.'."""

_ID_CHAR, _ID_NOT_DOT = r"[^/\\\x00-\x1f\x7f]", r"[^/.\\\x00-\x1f\x7f]"
SAMPLE_ID_PATTERN = rf"^(?:{_ID_CHAR}*{_ID_NOT_DOT}{_ID_CHAR}*/)*{_ID_CHAR}*{_ID_NOT_DOT}{_ID_CHAR}*$"
"""A sample id is a relative path (`2/0084.png`: an image folder's ids are its files' paths): parts
joined by '/', none empty or only dots, no backslash or control characters. So it never names a
place outside its folder, and it travels in a URL path segment by segment."""
MAX_SAMPLE_ID_LENGTH = 1024

SAMPLE_ID_RULE = (
    "a sample id is a relative path such as '2/0084.png': parts joined by '/', none empty or only dots, "
    "no backslash or control characters"
)


def _sample_id(value: str) -> str:
    """The pattern checked with a message that says the rule (pydantic's would print the regex)."""
    if not re.fullmatch(SAMPLE_ID_PATTERN, value):
        raise ValueError(SAMPLE_ID_RULE)
    return value


SampleId = Annotated[
    str,
    StringConstraints(max_length=MAX_SAMPLE_ID_LENGTH),
    AfterValidator(_sample_id),
    Field(
        description=f"a training sample's id; {SAMPLE_ID_RULE}",
        json_schema_extra={"pattern": SAMPLE_ID_PATTERN},
    ),
]


class Public(BaseModel):
    """Base of every response and request body: no unknown fields."""

    model_config = ConfigDict(extra="forbid")


class ErrorPublic(Public):
    """Every 4xx/5xx body: one sentence that says what is wrong and what to do about it."""

    detail: str = Field(description="what is wrong and how to fix the request")


class CheckPublic(Public):
    """One readiness check."""

    ok: bool
    detail: str = ""


class HealthPublic(Public):
    """Liveness: the process answers."""

    status: Literal["ok"] = "ok"
    version: str


class ReadinessPublic(Public):
    """Readiness: every dependency the service needs answers (the job queue, the stores root)."""

    ready: bool
    checks: dict[str, CheckPublic]
