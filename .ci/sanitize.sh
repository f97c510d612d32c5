#!/usr/bin/env bash
# CI step: the C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds edfkern's native extension with EDFKERN_SANITIZE=1 (-O1 -g -fsanitize=address,undefined,
# every finding fatal; CPU kernels only) into a build directory of its own, then runs the native
# kernel tests, the tiny-shape tests and the bad-input battery (every edfkern:: op and every
# edfkern._C function called directly, in subprocesses) with libasan preloaded. Python itself is not instrumented, and leaks
# are not checked (the interpreter keeps its allocations by design). Budget: under 10 minutes.
# Run from anywhere: .ci/sanitize.sh (uses the active python; set TORCH_EXTENSIONS_DIR to reuse a build).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

export EDFKERN_SANITIZE=1 EDFKERN_NO_CUDA=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}"
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export EDFKERN_REQUIRE_BACKENDS=native

ASAN_LIB="$(${CXX:-c++} -print-file-name=libasan.so)"
if [ ! -e "$ASAN_LIB" ]; then
  echo "sanitize.sh: libasan.so not found (${CXX:-c++} -print-file-name=libasan.so gave '$ASAN_LIB')" >&2
  exit 2
fi
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:alloc_dealloc_mismatch=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:${UBSAN_OPTIONS:-}"
# libstdc++ preloaded with it: ASan must see the real __cxa_throw at start-up, or the first C++
# exception (every TORCH_CHECK of a bad-input test) dies in its interceptor.
STDCXX_LIB="$(${CXX:-c++} -print-file-name=libstdc++.so)"
export LD_PRELOAD="$ASAN_LIB:$STDCXX_LIB${LD_PRELOAD:+:$LD_PRELOAD}"

# 1. build (the compilers run with the runtime preloaded too; harmless, and the build's own
#    import of the sanitized module needs it)
python -m edfkern.build

# 2. run under the sanitizers
python - <<'PY'
import edfkern, edfkern._extension as e
mod, why = e.load()
assert mod is not None, why
assert "asan" in e.build_dir(False), e.build_dir(False)
print("sanitized extension:", mod.__file__)
PY
python -m pytest -q -p no:cacheprovider tests/test_kernel_contract.py tests/test_special_values.py -k native
python -m pytest -q -p no:cacheprovider tests/test_adversarial.py -k "native or tiny or registered"
echo "sanitize.sh: clean in $(( $(date +%s) - start )) s"
