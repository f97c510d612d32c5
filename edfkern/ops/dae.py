"""Discriminative Area Enhancement (EDF, docs/ops.md).

EDF scales the image gradient by a soft mask built from each image's Grad-CAM:
``mask = U(cam) + beta`` where ``U(cam) >= tau`` and ``1`` elsewhere, with ``U`` the
bilinear upsampling to the image size and ``tau`` the map's mean (or a fixed
threshold). The fused backends never materialise ``U(cam)`` or the mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .._dispatch import kernel
from ._util import contiguous_outputs, keep_context, not_differentiable, register_inplace_fake

# ----------------------------------------------------------------------------- public API
#
# The public functions turn Python-level arguments into the registered ops' form (scalars checked
# and converted, a (N, 1, h, w) CAM viewed as (N, h, w)); the registered ops check every tensor.


def dae_mask(cam: Tensor, *, beta: float, threshold: Optional[float] = None,
             size: Optional[tuple[int, int]] = None) -> Tensor:
    """EDF's soft mask (``create_soft_mask``), without the per-image loop.

    Args:
        cam: ``(N, h, w)`` or ``(N, 1, h, w)`` Grad-CAM maps.
        beta: added to the map where it passes the threshold (EDF: 1 or 2).
        threshold: ``None`` or ``0`` for the per-image mean of the upsampled map, else a fixed value.
        size: ``(H, W)`` to upsample to (bilinear, ``align_corners=False``); ``None`` keeps ``(h, w)``.

    Returns:
        ``(N, 1, H, W)`` mask in ``cam.dtype``: ``U(cam)+beta`` where ``U(cam) >= tau``, else 1.
    """
    cam = as_cam(cam)
    beta = C.check_number("beta", beta)
    threshold = _threshold(threshold)
    H, W = C.check_size("size", size) if size is not None else tuple(cam.shape[-2:])
    return _dae_mask_op(cam, beta, threshold, H, W)


def dae_(grad: Tensor, cam: Tensor, *, beta: float, threshold: Optional[float] = None) -> Tensor:
    """Multiply ``grad`` in place by the DAE mask of ``cam`` (EDF: ``image_syn.grad *= mask``).

    Args:
        grad: ``(N, C, H, W)`` image gradient, modified in place (dtype kept).
        cam: ``(N, h, w)`` or ``(N, 1, h, w)`` low-resolution CAMs; upsampled on the fly.
        beta, threshold: as in :func:`dae_mask`.

    Returns:
        ``grad``.
    """
    C.check_tensor("grad", grad)
    cam = as_cam(cam)
    beta = C.check_number("beta", beta)
    threshold = _threshold(threshold)
    if grad.requires_grad and torch.is_grad_enabled():
        raise ValueError("grad must not require grad: dae_ rescales it in place and has no autograd formula")
    _dae__op(grad, cam, beta, threshold)
    return grad


def dae_sgd_step_(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], cam: Tensor, *, lr: float,
                  beta: float, threshold: Optional[float] = None, momentum: float = 0.5,
                  dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                  maximize: bool = False, first_step: bool = False) -> Tensor:
    """One fused pass of ``grad * mask`` followed by ``torch.optim.SGD``'s update of ``param``.

    Args:
        param: ``(N, C, H, W)`` synthetic images, updated in place.
        grad: ``(N, C, H, W)`` their gradient; not modified.
        momentum_buffer: ``(N, C, H, W)`` SGD momentum buffer, updated in place (``None`` allowed
            only when ``momentum == 0``). On ``first_step`` it is set to the masked gradient, as torch does.
        cam: ``(N, h, w)`` or ``(N, 1, h, w)`` CAMs.
        lr, momentum, dampening, weight_decay, nesterov, maximize: ``torch.optim.SGD``'s arguments.
        beta, threshold: as in :func:`dae_mask`.

    Returns:
        ``param``.
    """
    lr, momentum, dampening, weight_decay = C.check_sgd_args(lr, momentum, dampening, weight_decay, nesterov)
    maximize, first_step = C.check_bool("maximize", maximize), C.check_bool("first_step", first_step)
    C.check_tensor("param", param)
    C.check_tensor("grad", grad)
    C.check_optional_tensor("momentum_buffer", momentum_buffer)
    cam = as_cam(cam)
    beta = C.check_number("beta", beta)
    threshold = _threshold(threshold)
    with torch.no_grad():
        buf = momentum_buffer if momentum != 0 else None  # an unused buffer is neither read nor written
        _dae_sgd_step__op(param, grad, buf, cam, lr, beta, threshold, momentum, dampening, weight_decay,
                          bool(nesterov), maximize, first_step)
    return param


# ------------------------------------------------ registered ops (the one checked boundary: see edfkern/ops/__init__.py)


@torch.library.custom_op("edfkern::dae_mask", mutates_args=())
def _dae_mask_op(cam: Tensor, beta: float, threshold: Optional[float], H: int, W: int) -> Tensor:
    _check_mask_args(cam, H, W)
    return kernel("dae_mask", cam.device)(cam.contiguous(), beta, threshold, H, W)


@_dae_mask_op.register_fake
def _dae_mask_fake(cam, beta, threshold, H, W):
    check_cam(cam, None, None)  # H and W may be SymInts here; the public function and the op check them
    return cam.new_empty((cam.shape[0], 1, H, W))


_dae_mask_op.register_autograd(
    not_differentiable("dae_mask", "cam", "the mask is a step function of the CAM"), setup_context=keep_context)


@torch.library.custom_op("edfkern::dae_", mutates_args=("grad",))
def _dae__op(grad: Tensor, cam: Tensor, beta: float, threshold: Optional[float]) -> None:
    _check_dae_tensors(grad, cam)
    C.check_writable("grad", grad)
    C.check_no_alias(("grad",), grad=grad, cam=cam)
    if grad.numel() == 0:
        return
    with contiguous_outputs(grad) as (g,):
        kernel("dae_", grad.device)(g, cam.contiguous(), beta, threshold)


register_inplace_fake(_dae__op, lambda grad, cam, **_: _check_dae_tensors(grad, cam))


@torch.library.custom_op("edfkern::dae_sgd_step_", mutates_args=("param", "momentum_buffer"))
def _dae_sgd_step__op(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], cam: Tensor, lr: float,
                      beta: float, threshold: Optional[float], momentum: float, dampening: float,
                      weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> None:
    buf = check_step_tensors(param, grad, momentum_buffer, cam, momentum)
    if param.numel() == 0:
        return
    with contiguous_outputs(param, buf) as (p, b):
        kernel("dae_sgd_step_", param.device)(p, grad.contiguous(), b, cam.contiguous(), lr, beta, threshold,
                                              momentum, dampening, weight_decay, nesterov, maximize, first_step)


register_inplace_fake(_dae_sgd_step__op, lambda param, grad, momentum_buffer, cam, momentum, **_:
                      _check_step_shapes(param, grad, momentum_buffer, cam, momentum))


# ----------------------------------------------------------------------------- argument rules
#
# as_cam, check_cam and check_step_tensors are shared with edfkern.optim.DAESGD, whose all-or-nothing
# step checks every parameter before it writes the first one.


def as_cam(cam: object) -> Tensor:
    """A CAM tensor as the registered ops take it: ``(N, 1, h, w)`` viewed as ``(N, h, w)``; other shapes as given."""
    C.check_float_tensor("cam", cam)
    return cam[:, 0] if cam.dim() == 4 and cam.shape[1] == 1 else cam


def check_cam(cam: Tensor, n: Optional[int], device: Optional[torch.device]) -> None:
    """``cam`` is a non-empty float ``(N, h, w)`` with ``n`` maps on ``device`` (either ``None``: any)."""
    C.check_float_tensor("cam", cam)
    C.check_rank("cam", cam, (3,), "(N, h, w) or (N, 1, h, w)")
    if n is not None and cam.shape[0] != n:
        raise ValueError(f"cam must have N={n} maps (one per image), got shape {tuple(cam.shape)}")
    if cam.shape[0] == 0 or cam.shape[1] == 0 or cam.shape[2] == 0:
        raise ValueError(f"cam must be non-empty, got shape {tuple(cam.shape)}")
    if device is not None and cam.device != device:
        raise ValueError(f"cam must be on the same device as the gradient ({device}), got {cam.device}")


def _threshold(threshold: Optional[float]) -> Optional[float]:
    """None or 0 (EDF's ``act_threshold = 0.0``) select the per-image mean; anything else is fixed."""
    if threshold is None:
        return None
    t = C.check_number("threshold", threshold)
    return None if t == 0 else t


def _check_image(name: str, t: Tensor) -> None:
    C.check_float_tensor(name, t)
    C.check_rank(name, t, (4,), "(N, C, H, W)")


def _check_mask_args(cam: Tensor, H: int, W: int) -> None:
    check_cam(cam, None, None)
    H, W = C.check_size("size", (H, W))
    C.check_numel("the mask", (cam.shape[0], 1, H, W))


def _check_dae_tensors(grad: Tensor, cam: Tensor) -> None:
    """``dae_``'s shapes: grad (N, C, H, W), cam (N, h, w) on grad's device."""
    _check_image("grad", grad)
    check_cam(cam, grad.shape[0], grad.device)


def _check_step_shapes(param: Tensor, grad: Tensor, momentum_buffer: object, cam: Tensor, momentum: float) -> None:
    """``dae_sgd_step_``'s shapes, dtypes and devices (no memory is read)."""
    _check_image("param", param)
    C.check_float_tensor("grad", grad)
    C.check_shape("grad", grad, param.shape, "(N, C, H, W) like param")
    C.check_same_device(param=param, grad=grad)
    C.check_same_dtype(param=param, grad=grad)
    C.check_optional_tensor("momentum_buffer", momentum_buffer)
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("momentum_buffer must be a tensor like param when momentum != 0, got None")
    if momentum_buffer is not None:
        C.check_float_tensor("momentum_buffer", momentum_buffer)
        C.check_shape("momentum_buffer", momentum_buffer, param.shape, "(N, C, H, W) like param")
        C.check_same_device(param=param, momentum_buffer=momentum_buffer)
        C.check_same_dtype(param=param, momentum_buffer=momentum_buffer)
    check_cam(cam, param.shape[0], param.device)


def check_step_tensors(param: Tensor, grad: Tensor, momentum_buffer: object, cam: Tensor,
                       momentum: float) -> Optional[Tensor]:
    """Every rule on ``dae_sgd_step_``'s tensors; returns the buffer the step writes (``None`` when
    ``momentum == 0``). The written tensors (param, buffer) each own their memory and share none with
    grad or cam."""
    _check_step_shapes(param, grad, momentum_buffer, cam, momentum)
    buf = momentum_buffer if momentum != 0 else None
    C.check_writable("param", param)
    if buf is not None:
        C.check_writable("momentum_buffer", buf)
    C.check_no_alias(("param", "momentum_buffer"), param=param, grad=grad, momentum_buffer=buf, cam=cam)
    return buf
