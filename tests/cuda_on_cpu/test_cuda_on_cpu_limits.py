"""The source half of tools/cuda_limits.py (the sm_90 check does the register half with nvcc): every
kernel launched at 1024 threads per block carries __launch_bounds__."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shim_build import REPO

pytestmark = pytest.mark.cuda_on_cpu


def test_launch_bounds_on_1024_thread_kernels():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "cuda_limits.py"), "--source"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
