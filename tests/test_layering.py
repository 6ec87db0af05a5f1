"""The import contract: cli -> service, worker -> storage -> retrac -> api_schemas, and no cycles.

Every import statement of every module is checked, at module level, under `if TYPE_CHECKING:` or inside
a function, by walking the syntax tree (a lazy import inside a function breaks the layering as much as
one at the top). No two project files may import each other, directly or through others: a cycle makes
the import order matter and hides which module is the lower one.
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


def module_name(file: Path, root: Path = ROOT) -> str:
    """`storage/store.py` -> `storage.store`; a package's `__init__.py` is the package."""
    parts = file.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_files(module: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The project modules (of `known`) that `module`'s source imports, wherever the import stands.

    `from a.b import c` names module `a.b.c` when that is a file, else `a.b`; relative imports are
    resolved against the module's package. A parent package's `__init__` that Python runs on the way
    is not counted: only the module an import names."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def import_graph(sources: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, from {module: (is_package, source)}."""
    known = set(sources)
    return {m: imported_files(m, is_package, text, known) for m, (is_package, text) in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each set of modules that import one another (a strongly connected component of two or more, by
    Tarjan's algorithm), sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return sorted(found)


def project_sources() -> dict[str, tuple[bool, str]]:
    files = [file for package in PACKAGES for file in sorted((ROOT / package).rglob("*.py"))]
    return {module_name(file): (file.name == "__init__.py", file.read_text()) for file in files}


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


def test_no_two_files_import_each_other() -> None:
    graph = import_graph(project_sources())
    assert len(graph) > 50  # every module was read
    assert import_cycles(graph) == []


def test_the_cycle_check_counts_type_checking_and_function_imports() -> None:
    sources = {
        "pkg": (True, ""),
        "pkg.errors": (
            False, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.repo import Repo\n"
        ),
        "pkg.repo": (False, "def load():\n    from . import errors\n"),
        "pkg.main": (False, "from pkg import errors, repo\nimport pkg.leaf\n"),
        "pkg.leaf": (False, "import os\n"),
    }
    graph = import_graph(sources)
    assert graph["pkg.repo"] == {"pkg.errors"}  # a relative import inside a function
    assert graph["pkg.main"] == {"pkg.errors", "pkg.repo", "pkg.leaf"}
    assert import_cycles(graph) == [["pkg.errors", "pkg.repo"]]
    sources["pkg.repo"] = (False, "import os\n")
    assert import_cycles(import_graph(sources)) == []
