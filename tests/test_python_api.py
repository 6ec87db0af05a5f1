"""The public Python API: `retrac.__all__` resolves, costs no torch import until used, and
docs/python.md's worked example runs as written (its code blocks, in order, in an empty folder)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrac

ROOT = Path(__file__).resolve().parents[1]
PYTHON_PAGE = ROOT / "docs" / "python.md"


def test_every_public_name_resolves_to_its_definition() -> None:
    assert set(retrac.__all__) == {*retrac._HOMES, "__version__"}
    for name in retrac.__all__:
        value = getattr(retrac, name)
        if name != "__version__":
            assert value.__name__ == name, name  # the class or function itself, not a module
    assert set(retrac.__all__) <= set(dir(retrac))
    with pytest.raises(AttributeError, match="no attribute 'Attributer'"):
        retrac.Attributer  # noqa: B018  (a misspelt name is refused, not None)


def test_version_is_the_installed_package_version() -> None:
    assert retrac.__version__ == importlib.metadata.version("retrac")


def test_importing_retrac_imports_no_torch() -> None:
    probe = "import sys, retrac; retrac.__all__; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert loaded.stdout.split() == ["False", "False"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_worked_example_of_docs_python_md_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(PYTHON_PAGE)
    assert len(blocks) >= 4  # train, index, attribute, store
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": "docs_python_example"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"{PYTHON_PAGE.name} block {number}", "exec"), namespace)  # noqa: S102
    assert sorted(os.listdir(tmp_path)) == ["runs", "stores"]
    assert namespace["best"].sample_id in namespace["stored"]  # type: ignore[attr-defined]
