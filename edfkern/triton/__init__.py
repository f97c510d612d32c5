"""The ``triton`` backend: fused Triton kernels for every function of the backend contract.

Same names, arguments and results as ``edfkern.reference`` (see its docstring for the
contract). Plain functions, registered nowhere: the ``edfkern::`` ops (``edfkern/ops/``) check
the arguments and call them through ``edfkern._dispatch.kernel``. Runs on CUDA tensors, and on
CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how CI
without a GPU tests it.

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

