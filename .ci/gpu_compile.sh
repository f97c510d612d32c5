#!/usr/bin/env bash
# CI: compile every Triton specialisation the launchers use (captured at the named configs) and
# every csrc/cuda/*.cu kernel for sm_90 on this GPU-less machine; fail on a compile error, a
# register spill or shared memory above 227 KB per block, or a launch configuration over the
# register file (see docs/gpu.md).
# Needs triton (its bundled ptxas) and nvcc. Results are cached in $EDFKERN_GPUCHECK_CACHE
# (default ~/.cache/edfkern-gpucheck): keep that folder between CI runs to make reruns fast.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
out="${1:-${TMPDIR:-/tmp}/gpucheck-sm90.json}"
python -m tools.gpucheck compile-sm90 --json "$out"
# every CUDA launch configuration: registers x threads <= 65,536, occupancy, __launch_bounds__ at 1024 threads
python tools/cuda_limits.py
