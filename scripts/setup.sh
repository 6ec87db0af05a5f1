#!/usr/bin/env bash
# Create .venv and install retrac into it. torch comes first and pinned: other specs pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${1:-test}]"
# The client generator the tests run pins an older typer than retrac's: it gets a folder of its own.
if [ "${1:-test}" = "test" ]; then
    .venv/bin/python -m pip install --quiet --upgrade --target .venv/openapi-client-generator -r tests/client-generator.txt
fi
