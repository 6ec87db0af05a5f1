"""The documentation's own contracts: short module docstrings, and links into docs/ that resolve.

Module docstrings state what a module is for, its invariants, shapes and errors; measured figures live
in docs/performance.md, which code cites by section (`docs/performance.md#query-side-gradients`). A
cited file or section that does not exist is a broken promise, so every `NAME.md#section` reference in
the code and in the Markdown pages must name a heading of that page.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("api_schemas", "retrac", "storage", "worker", "service", "cli", "bench", "examples")
MAX_DOCSTRING_LINES = 25

REFERENCE = re.compile(r"(?P<page>[\w./-]*\.md)#(?P<section>[\w-]+)")


def python_files() -> list[Path]:
    return sorted(path for package in CODE for path in (ROOT / package).rglob("*.py"))


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # a `#` comment in a code block is no heading
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def cited_page(source: Path, page: str) -> Path:
    """Paths from the code name the page from the repository root; links in a page from its folder."""
    if source.suffix == ".py" or page.startswith("docs/"):
        return ROOT / page
    return source.parent / page


@pytest.mark.parametrize("path", python_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_module_docstring_is_a_short_contract(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    if docstring is None:
        return
    lines = len(docstring.strip("\n").splitlines())
    assert lines <= MAX_DOCSTRING_LINES, f"{lines} lines: move figures to docs/performance.md"


def test_every_cited_section_exists() -> None:
    broken = []
    for source in [*python_files(), *markdown_files()]:
        for match in REFERENCE.finditer(source.read_text()):
            page = cited_page(source, match["page"])
            if not page.is_file() or match["section"] not in anchors(page):
                broken.append(f"{source.relative_to(ROOT)}: {match[0]}")
    assert broken == []


def test_anchor_follows_github() -> None:
    assert anchor("Approximate search (`search: \"approximate\"`)") == "approximate-search-search-approximate"
    assert anchor("Per-sample gradients (training side)") == "per-sample-gradients-training-side"


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160
    commands = [line.split()[0] for line in lines if line.startswith("./scripts/")]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    assert all((ROOT / command).is_file() for command in commands)
