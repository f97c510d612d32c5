"""The contract cases once more, on a build with -fsanitize=address,undefined (every finding fatal),
in a subprocess with libasan preloaded (Python itself is not instrumented; leaks are not checked, as in
.ci/sanitize.sh). One run order, and not the two largest covariance cases, to keep the tier short."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest

from shim_build import REPO, build, cxx

pytestmark = pytest.mark.cuda_on_cpu

CONTRACT = Path(__file__).with_name("test_cuda_on_cpu_contract.py")


def run_under_asan(test_args: Sequence[str], csrc: Optional[Path] = None) -> subprocess.CompletedProcess:
    """pytest on ``test_args`` (files of this folder, -k ...) with the sanitizer build of ``csrc`` (default
    the repository's) as the shim kernels, forward order only; findings exit 86 (ASan) or 87 (UBSan)."""
    build("asan", **({"csrc": csrc} if csrc else {}))  # here, so that a compile error reads as one
    lib = lambda name: subprocess.run([cxx(), f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, EDFKERN_CUDA_ON_CPU_VARIANT="asan", EDFKERN_CUDA_ON_CPU_ORDERS="forward",
               LD_PRELOAD=f"{lib('libasan.so')}:{lib('libstdc++.so')}",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:alloc_dealloc_mismatch=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    if csrc:
        env["EDFKERN_CUDA_ON_CPU_CSRC"] = str(csrc)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda_on_cpu", *test_args, "-s"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_contract_under_asan_and_ubsan():
    res = run_under_asan([str(CONTRACT), "-k", "not l_multiple_of_16 and not many_blocks"])
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
