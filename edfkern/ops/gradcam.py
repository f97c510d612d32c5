"""Grad-CAM maps from a target layer's activations and gradients (docs/ops.md).

``gradcam``, ``gradcam++`` and torchcam-0.4-compatible ``smoothgradcam++`` (the
CAM EDF's released code uses), then ReLU, per-map min-max normalisation and,
optionally, bilinear upsampling to the image size.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .._dispatch import kernel
from ._util import keep_context, not_differentiable

METHODS = ("gradcam", "gradcam++", "smoothgradcam++")

# ----------------------------------------------------------------------------- public API


def grad_cam(activations: Tensor, gradients: Tensor, *, method: str = "gradcam", size: Optional[tuple[int, int]] = None,
             normalize: bool = True, clean_activations: Optional[Tensor] = None) -> Tensor:
    """Class activation maps for a batch, in one fused op.

    Args:
        activations: target-layer activations ``A``, ``(N, C, h, w)``; ``(S, N, C, h, w)`` for
            ``"smoothgradcam++"`` (one slice per noisy pass).
        gradients: gradients of the class scores w.r.t. ``A``, same shape as ``activations``.
        method: ``"gradcam"`` (``w = mean_hw G``), ``"gradcam++"`` (``alpha = G^2 / (2G^2 +
            sum_hw(A G^3) + 1e-8)``, ``w = sum_hw alpha ReLU(G)``) or ``"smoothgradcam++"`` (the same with
            ``G^2``, ``G^3`` averaged over the S passes and ``A_clean`` in the denominator; weights and
            map from the last pass, as torchcam 0.4 does).
        size: ``(H, W)`` to upsample the normalised map to (bilinear, ``align_corners=False``).
        normalize: per-map ``cam -= min; cam /= max + 1e-8`` (torchcam's order).
        clean_activations: ``(N, C, h, w)`` activations of the clean input; required for
            ``"smoothgradcam++"``, rejected otherwise.

    Returns:
        ``(N, h, w)``, or ``(N, H, W)`` with ``size``; float32 (float64 for float64 inputs).
    """
    _check_method(method)
    normalize = C.check_bool("normalize", normalize)
    hw = list(C.check_size("size", size)) if size is not None else None
    C.check_tensor("activations", activations)
    C.check_tensor("gradients", gradients)
    C.check_optional_tensor("clean_activations", clean_activations)
    return _grad_cam_op(activations, gradients, clean_activations, method, normalize, hw)


# ------------------------------------------------ registered op (the one checked boundary: see edfkern/ops/__init__.py)


@torch.library.custom_op("edfkern::grad_cam", mutates_args=())
def _grad_cam_op(activations: Tensor, gradients: Tensor, clean_activations: Optional[Tensor], method: str,
                 normalize: bool, size: Optional[list[int]]) -> Tensor:
    _check_tensors(activations, gradients, clean_activations, method)
    _check_size(activations, size)
    clean = None if clean_activations is None else clean_activations.contiguous()
    return kernel("grad_cam", activations.device)(
        activations.contiguous(), gradients.contiguous(), clean, method, normalize,
        None if size is None else (int(size[0]), int(size[1])))


@_grad_cam_op.register_fake
def _grad_cam_fake(activations, gradients, clean_activations, method, normalize, size):
    _check_tensors(activations, gradients, clean_activations, method)  # N, h, w and size may be SymInts
    n, h, w = activations.shape[-4], activations.shape[-2], activations.shape[-1]
    hh, ww = (h, w) if size is None else size
    return activations.new_empty((n, hh, ww), dtype=C.acc_dtype(activations.dtype))


_grad_cam_op.register_autograd(
    not_differentiable("grad_cam", "activations/gradients", "CAMs are used as constants by DAE"),
    setup_context=keep_context)


# ----------------------------------------------------------------------------- argument checks


def _check_method(method: object) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_tensors(activations: Tensor, gradients: Tensor, clean_activations: Optional[Tensor], method: str) -> None:
    """The registered op's rules that hold for symbolic sizes too: the method, the tensors' ranks,
    shapes, dtypes and devices."""
    _check_method(method)
    C.check_float_tensor("activations", activations)
    C.check_float_tensor("gradients", gradients)
    smooth = method == "smoothgradcam++"
    layout = "(S, N, C, h, w)" if smooth else "(N, C, h, w)"
    C.check_rank("activations", activations, (5,) if smooth else (4,), layout)
    C.check_shape("gradients", gradients, activations.shape, layout + " like activations")
    C.check_same_dtype(activations=activations, gradients=gradients)
    C.check_same_device(activations=activations, gradients=gradients)
    if smooth:
        if clean_activations is None:
            raise ValueError("clean_activations (N, C, h, w) is required for method='smoothgradcam++'")
        C.check_float_tensor("clean_activations", clean_activations)
        C.check_shape("clean_activations", clean_activations, activations.shape[1:], "(N, C, h, w)")
        C.check_same_dtype(activations=activations, clean_activations=clean_activations)
        C.check_same_device(activations=activations, clean_activations=clean_activations)
        if activations.shape[0] == 0:
            raise ValueError("activations must hold at least one noisy pass (S >= 1)")
    elif clean_activations is not None:
        raise ValueError(f"clean_activations is only used by method='smoothgradcam++', not {method!r}")
    if activations.shape[-2] == 0 or activations.shape[-1] == 0 or activations.shape[-3] == 0:
        raise ValueError(f"activations must have C, h, w >= 1, got shape {tuple(activations.shape)}")


def _check_size(activations: Tensor, size: Optional[list[int]]) -> None:
    """The output size and the CAMs' element count (the real op only: under tracing they are SymInts)."""
    hw = C.check_size("size", size) if size is not None else tuple(activations.shape[-2:])
    C.check_numel("the CAMs", (activations.shape[-4],) + hw)
