"""The import contract: cli -> service, worker -> storage -> retrac -> api_schemas.

Every import statement of every module is checked, at module level or inside a function, by walking
the syntax tree (a lazy import inside a function breaks the layering as much as one at the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api_schemas", "retrac", "storage", "worker", "service", "cli")

FORBIDDEN: dict[str, frozenset[str]] = {
    "api_schemas": frozenset(
        {"torch", "diffusers", "numpy", "retrac", "storage", "worker", "service", "cli"}
    ),
    "retrac": frozenset(
        {"fastapi", "starlette", "celery", "kombu", "redis", "uvicorn", "storage", "worker", "service", "cli"}
    ),
    "storage": frozenset({"fastapi", "starlette", "celery", "kombu", "uvicorn", "worker", "service", "cli"}),
    "worker": frozenset({"fastapi", "starlette", "uvicorn", "service", "cli"}),
    "service": frozenset({"cli"}),
    "cli": frozenset(),
}
"""Top-level modules each package must not import. `service` may submit jobs through `worker`."""


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, top-level module name) of every absolute import in `source`, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    bad = []
    for file in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(file.read_text()):
            if module in FORBIDDEN[package]:
                bad.append(f"{file.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_package_respects_the_layering(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


def test_the_walk_sees_imports_inside_functions() -> None:
    source = "import os\n\ndef f():\n    from storage.store import GradientStore\n    import celery.app\n"
    assert [m for _, m in imported_modules(source)] == ["os", "storage", "celery"]
