"""The schemathesis CLI fuzzes the served OpenAPI schema of a real uvicorn: no request gets a 5xx, and
every answer matches the schema. Bounded: a few dozen examples per operation.

The server runs on its own copy of the built index, so whatever the generated requests create or
delete touches no other test's store.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.main import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, INDEX
from tests.service.servers import serve_in_thread

pytestmark = pytest.mark.slow

EXAMPLES = 20
"""Per operation: 12 operations, under two minutes on 2 cores."""

CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"

SCRATCH = "scratch"
CONFIG = f"""
# The index's sub-resources (queries, samples, diagnostics) get the real index and a real sample id,
# so generated requests reach the query code instead of stopping at a 404.
[[operations]]
include-path-regex = '^/v1/indexes/[{{]name[}}]/'
parameters = {{ "path.name" = "{INDEX}", "path.sample_id" = "digit-0003-3" }}

# Deletion gets a copy of its own (schemathesis reuses names it reads from responses).
[[operations]]
include-path = "/v1/indexes/{{name}}"
include-method = "DELETE"
parameters = {{ "path.name" = "{SCRATCH}" }}
"""


def test_fuzzing_the_schema_finds_no_server_error(
    settings: Settings, built_index: str, tmp_path: Path
) -> None:
    stores = tmp_path / "stores"
    for name in (INDEX, SCRATCH):
        shutil.copytree(settings.stores_root / INDEX, stores / name)
    app = create_app(settings.model_copy(update={"stores_root": stores}))
    schemathesis = Path(sys.executable).with_name("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with serve_in_thread(app) as url:
        run = subprocess.run(
            [
                str(schemathesis),
                "--config-file",
                str(config),
                "run",
                f"{url}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(EXAMPLES),
                "--phases",
                "examples,coverage,fuzzing",
                "--seed",
                "1",
                "--no-shrink",
                "--generation-database",
                "none",
                "--header",
                f"X-API-Key: {API_KEY}",
                "--request-timeout",
                "120",
                "--workers",
                "1",
                "--no-color",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
