"""The contract cases once more, on a build with -fsanitize=address,undefined (every finding fatal),
in a subprocess with libasan preloaded (Python itself is not instrumented; leaks are not checked, as in
.ci/sanitize.sh). One run order, and not the two largest covariance cases, to keep the tier short."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shim_build import REPO, build, cxx

pytestmark = pytest.mark.cuda_on_cpu


def test_contract_under_asan_and_ubsan():
    build("asan")  # here, so that a compile error reads as one
    lib = lambda name: subprocess.run([cxx(), f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, EDFKERN_CUDA_ON_CPU_VARIANT="asan", EDFKERN_CUDA_ON_CPU_ORDERS="forward",
               LD_PRELOAD=f"{lib('libasan.so')}:{lib('libstdc++.so')}",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:alloc_dealloc_mismatch=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda_on_cpu",
           str(Path(__file__).with_name("test_cuda_on_cpu_contract.py")), "-k", "not l_multiple_of_16 and not many_blocks", "-s"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
