"""The service's own errors, each answered with its HTTP status by `service.handlers`.

The engine's and the store's named errors (`retrac.exceptions`, `storage.errors`) are answered there too.
"""

from __future__ import annotations

__all__ = ["Conflict", "NotFound", "Unavailable"]


class NotFound(LookupError):
    """No index, job or sample of that name."""


class Conflict(RuntimeError):
    """The request clashes with the state of an index (it exists already, it is still building)."""


class Unavailable(RuntimeError):
    """A dependency of the request (the job queue) does not answer."""
