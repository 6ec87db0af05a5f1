#!/usr/bin/env bash
# The GPU check, one script under ~8 minutes on one GPU: the CUDA store tests (tests/gpu), one store built
# on the device and on the CPU compared with a query on each (bench/gpu_check.py), then the budgeted bench
# cases on the device (bench/budgeted.py). One JSON object per line on stdout.
# Usage: scripts/gpu_check.sh [--device cpu]   (cpu: a dry run of every step: one repeat, 3GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=cuda
REPEATS=3
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device needs a value}; fi
BUDGET=default
if [ "$DEVICE" = "cpu" ]; then REPEATS=1; BUDGET=3GiB; fi
"$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu >&2
"$PYTHON" bench/gpu_check.py --device "$DEVICE"
for case in cifar10 minisd_lora4 minisd_lora64; do
    "$PYTHON" bench/budgeted.py --case "$case" --device "$DEVICE" --memory-budget "$BUDGET" --repeats "$REPEATS"
done
