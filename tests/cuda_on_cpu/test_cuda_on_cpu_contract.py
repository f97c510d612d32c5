"""The native kernel-contract cases (tests/test_kernel_contract.py), rerun on the CUDA source run on the
CPU: the same test bodies and parameters, with ``K`` the shim's kernels (conftest.py), judged against
``edfkern.reference`` by the same tolerance rule. Every call inside runs in three orders and must
give the same bits in each (shim_kernels.py), except CPD's kept sums, which float64 atomics add in
block order: those agree within a few ulps.
"""
from __future__ import annotations

import functools

import pytest

import test_kernel_contract as contract

pytestmark = pytest.mark.cuda_on_cpu

CASES = ["test_dae_mask_and_scale", "test_dae_mixed_dtypes", "test_dae_sgd_step", "test_grad_cam",
         "test_cpd_forward_backward", "test_cpd_keep_mask", "test_covariance", "test_covariance_many_blocks",
         "test_covariance_l_multiple_of_16", "test_flat_features"]


# Known defect, kept visible: on these half-precision inputs, gradcam++'s alpha denominator nearly
# cancels and the CUDA kernel's block-reduction order lands 4-5x further from fp64 than plain float32
# (the same cases as Triton's xfail in the contract tests).
KNOWN_GRADCAM = {("gradcam++", "torch.float16", (4, 4)), ("smoothgradcam++", "torch.float16", (5, 3))}


def _rerun(name: str):
    """The contract test ``name`` with its parameters (functools.wraps keeps the marks and signature)."""
    fn = getattr(contract, name)

    @functools.wraps(fn)
    def test(*args, **kwargs):
        if name == "test_grad_cam" and (kwargs["method"], str(kwargs["dtype"]), kwargs["hw"]) in KNOWN_GRADCAM:
            kwargs["request"].applymarker(pytest.mark.xfail(strict=True, reason="CUDA gradcam++ fp16 accuracy"))
        return fn(*args, **kwargs)

    return test


for _name in CASES:
    globals()[_name] = _rerun(_name)
del _name
