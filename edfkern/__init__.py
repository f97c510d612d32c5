"""edfkern: fused kernels for EDF and IID dataset distillation.

Ops (docs/ops.md): :func:`dae_mask`, :func:`dae_`, :func:`dae_sgd_step_`, :func:`grad_cam`,
:func:`cpd_trajectory_loss`, :func:`cpd_keep_mask`, :func:`trajectory_matching_loss`, :func:`local_covariance`,
:func:`covariance_matching_loss`, :func:`class_centralization_loss`, :func:`mean_matching_loss`.
Backends: :func:`set_backend`, :func:`use_backend`, :func:`backends`.
"""
from . import _backends, config  # noqa: F401  (registers the backends)
from ._dispatch import backends, current_backend, set_backend, use_backend
from .ops.covariance import covariance_matching_loss, local_covariance
from .ops.cpd import cpd_keep_mask, cpd_trajectory_loss
from .ops.dae import dae_, dae_mask, dae_sgd_step_
from .ops.features import class_centralization_loss, mean_matching_loss
from .ops.gradcam import grad_cam
from .trajectory import trajectory_matching_loss

__version__ = "0.1.0"

__all__ = [
    "dae_mask", "dae_", "dae_sgd_step_", "grad_cam",
    "cpd_trajectory_loss", "cpd_keep_mask",
    "trajectory_matching_loss",
    "local_covariance", "covariance_matching_loss", "class_centralization_loss", "mean_matching_loss",
    "set_backend", "use_backend", "backends", "current_backend", "config",
]
