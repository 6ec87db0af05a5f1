"""The built wheel deploys: installed into a fresh venv outside the checkout, `retrac serve` answers
`/`, `/docs` and the docs' own script, with no file from the checkout and no internet."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "cli", "retrac", "storage", "worker", "service", "api_schemas")
START_SECONDS = 120
"""How long the server may take to import torch and diffusers on a loaded 2-core machine."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin/` of a fresh venv with only the wheel installed; dependencies come from this interpreter's
    site-packages through a plain path line (so torch is not reinstalled)."""
    base = tmp_path_factory.mktemp("package")
    source = base / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        if (REPOSITORY / name).is_dir():
            shutil.copytree(REPOSITORY / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPOSITORY / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist"), "."], cwd=source, check=True, timeout=300)
    wheel = next((base / "dist").glob("retrac-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


@pytest.mark.slow
def test_the_wheel_carries_the_web_page_and_serves_it_with_its_docs(installed: Path, tmp_path: Path) -> None:
    version = subprocess.run(
        [installed / "retrac", "--version"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert version.stdout.startswith("retrac ")
    where = subprocess.run([installed / "python", "-c", "import service; print(service.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert not where.startswith(str(REPOSITORY)), where  # the installed copy, not the checkout
    port = free_port()
    (tmp_path / "stores").mkdir()
    env = {**os.environ, "RETRAC_STORES_ROOT": str(tmp_path / "stores"), "PYTHONPATH": ""}
    server = subprocess.Popen([installed / "retrac", "serve", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else "server exited"
            try:
                page = httpx.get(f"{base}/", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.5)
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        docs = httpx.get(f"{base}/docs", timeout=10)
        assert docs.status_code == 200
        assert "cdn" not in docs.text
        script = docs.text.split('<script src="', 1)[1].split('"', 1)[0]
        asset = httpx.get(f"{base}{script}", timeout=30)
        assert asset.status_code == 200
        assert "SwaggerUIBundle" in asset.text
        redoc = httpx.get(f"{base}/redoc", timeout=10)
        assert redoc.status_code == 200
        assert "cdn" not in redoc.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_page_the_api_and_the_cli_share_one_set_of_query_defaults() -> None:
    import re

    import typer

    from api_schemas.attribution import QueryOptions
    from api_schemas.specs import DEFAULT_DRAWS, DEFAULT_TIMESTEPS, DEFAULT_TOP_K
    from cli import app

    page = (REPOSITORY / "service" / "static" / "index.html").read_text()
    shown = {
        name: int(re.search(rf'id="{name}"[^>]*value="(\d+)"', page).group(1))
        for name in ("top_k", "timesteps", "draws")
    }
    expected = {"top_k": DEFAULT_TOP_K, "timesteps": DEFAULT_TIMESTEPS, "draws": DEFAULT_DRAWS}
    assert shown == expected
    assert {k: getattr(QueryOptions(), k) for k in expected} == expected
    cli = {option.name: option.default for option in typer.main.get_command(app).commands["attribute"].params}
    assert {k: cli[k] for k in expected} == expected
