"""The CUDA-source-on-CPU tier (docs/gpu.md): csrc/cuda/*.cu compiled by g++ against the shim in
``shim/`` and run on CPU tensors. Every test here carries the ``cuda_on_cpu`` marker, which the
default run deselects (pyproject.toml); ``python -m pytest -m cuda_on_cpu -q`` runs the tier."""
from __future__ import annotations

import pytest

from shim_kernels import ShimKernels, kernels


@pytest.fixture(scope="session")
def K() -> ShimKernels:
    """The contract functions on the shim build (the variant in $EDFKERN_CUDA_ON_CPU_VARIANT, default plain)."""
    return kernels()
