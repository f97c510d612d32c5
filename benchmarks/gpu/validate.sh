#!/usr/bin/env bash
# The one prepared GPU validation run (see docs/gpu.md). On a lent H100/H200:
#     bash benchmarks/gpu/validate.sh            # results under $OUT (or ./gpucheck-out)
#     bash benchmarks/gpu/validate.sh --steps bench,cam   # rerun only some steps
# On CPU (CI):  bash benchmarks/gpu/validate.sh --dry-run
# Every step has its own budget (tools/gpucheck/validate.py); the budgets add up to < 9 min.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
exec "$PY" -m tools.gpucheck validate "$@"
