"""The ``triton`` backend: fused Triton kernels for every function of the backend contract.

Same names, arguments and results as ``edfkern.reference`` (see its docstring for the
contract). Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before triton is imported), which is how CI without a GPU tests it.

One op family per module, each read top-down (kernels, then launchers):
``dae.py``, ``gradcam.py``, ``cpd.py``, ``covariance.py``, ``features.py``; launch
heuristics and shared device helpers live in ``_utils.py``.
"""
from .covariance import cov_backward, cov_forward
from .cpd import cpd_backward, cpd_forward, cpd_keep_mask
from .dae import dae_, dae_mask, dae_sgd_step_
from .features import cc_backward, cc_forward, seg_mean
from .gradcam import grad_cam

__all__ = [
    "dae_mask", "dae_", "dae_sgd_step_", "grad_cam", "cpd_forward", "cpd_backward", "cpd_keep_mask",
    "cov_forward", "cov_backward", "seg_mean", "cc_forward", "cc_backward",
]


def _check_registered_ops() -> None:
    """``torch.ops.edfkern_triton.*`` are callable directly: give each one the contract's argument
    checks (edfkern/ops/_contract.py) as its eager CPU/CUDA kernel, so bad offsets, perms or shapes
    raise ``ValueError``/``TypeError`` instead of reaching a kernel. Under torch.compile the op is
    traced into its Triton kernels as before."""
    import torch

    from ..ops._contract import checked

    ns = getattr(torch.ops, "edfkern_triton", None)
    for name in __all__:
        if ns is None or not hasattr(ns, name):
            continue
        torch.library.register_kernel(f"edfkern_triton::{name}", ("cpu", "cuda"), checked(name, globals()[name]))


_check_registered_ops()
