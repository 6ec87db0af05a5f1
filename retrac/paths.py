"""Confining paths to a configured root, so that no path a client gives can leave it."""

from __future__ import annotations

from pathlib import Path

from retrac.exceptions import SpecError


def resolve_inside(root: Path | None, path: str | Path) -> Path:
    """`path` resolved against `root` (symlinks followed); an error if it ends up outside `root`.

    With no root, the path is only resolved: the caller is trusted (the CLI on the user's machine).
    """
    if root is None:
        return Path(path).expanduser().resolve()
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise SpecError(f"path {str(path)!r} leaves the configured root; give a path inside {base}")
    return target
