"""The source half of tools/cuda_limits.py (the sm_90 check does the register half with nvcc): every
kernel launched at 1024 threads per block carries __launch_bounds__."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shim_build import REPO, build

pytestmark = pytest.mark.cuda_on_cpu


def test_launch_bounds_on_1024_thread_kernels():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "cuda_limits.py"), "--source"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_each_library_owns_its_shared_storage():
    """GCC marks a function template's static (``block_reduce``'s ``__shared__ raw``) STB_GNU_UNIQUE,
    which the dynamic linker binds process-wide to the first library loaded, -Bsymbolic or not: a
    later library (the sanitizer build, a seeded mutant) then used the first one's storage, which its
    runtime never fills with 0xff, and a missing ``__syncthreads`` read stale values unseen."""
    lib = build("plain")
    out = subprocess.run(["readelf", "-sW", "--dyn-syms", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    unique = [line.split()[-1] for line in out.splitlines() if " UNIQUE " in line]
    assert not unique, f"{lib.name} has process-wide (STB_GNU_UNIQUE) symbols: {unique[:4]}"
