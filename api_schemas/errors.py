"""Validation errors as the messages retrac prints: where (the field, or the fields a check concerns)
and what, without pydantic's prefixes ("Value error, ..."). The CLI and the HTTP service both turn a
validation error's items (`ValidationError.errors()`) into messages here, each naming the place in its
own words (a flag, a request field).

A validator that checks several fields together raises `FieldError(message, "grid", "noise")` (dotted
names reach into a nested model: "slots.replay"), so the message is placed at those fields (relative to
the model that raised it), not at the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FieldError", "Problem", "dotted", "messages", "problems"]

Location = tuple[str | int, ...]
"""Path of a field from the validated model: `("slots", "grid")`, `("images", 0)`."""


class FieldError(ValueError):
    """A validator's complaint about `fields` of the model that raises it."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class Problem:
    """One thing wrong with validated input: the places it concerns (at least one) and what is wrong."""

    places: tuple[Location, ...]
    message: str


ErrorItems = Iterable[Mapping[str, Any]]
"""What `ValidationError.errors()` (and FastAPI's `RequestValidationError.errors()`) returns."""


def problems(errors: ErrorItems) -> list[Problem]:
    """Every problem of `errors`, in pydantic's order, with the message a validator raised as it is."""
    found = []
    for item in errors:
        location = tuple(item["loc"])
        cause = item.get("ctx", {}).get("error")
        message = str(cause) if isinstance(cause, Exception) else item["msg"]
        if isinstance(cause, FieldError) and cause.fields:
            found.append(Problem(tuple((*location, *field.split(".")) for field in cause.fields), message))
        else:
            found.append(Problem((location,), message))
    return found


def dotted(location: Location) -> str:
    """A location as `slots.grid` (empty for the model itself)."""
    return ".".join(str(part) for part in location)


def messages(errors: ErrorItems, name: Callable[[Location], str] = dotted) -> list[str]:
    """Every problem as `place: message` (places joined by ', '), each place called `name(location)`;
    a problem with the whole input (no place) is its message alone."""
    shown = []
    for problem in problems(errors):
        places = ", ".join(dict.fromkeys(filter(None, map(name, problem.places))))
        shown.append(f"{places}: {problem.message}" if places else problem.message)
    return shown
