#!/usr/bin/env bash
# The main job on the embedded default: train, index, query and evaluate on built-in data (CPU, no Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
exec .venv/bin/retrac demo "$@"
