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
from ._util import keep_context, not_differentiable

# ----------------------------------------------------------------------------- public API


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
    cam = _check_cam(cam, None, None)
    beta = C.check_number("beta", beta)
    threshold = _check_threshold(threshold)
    H, W = C.check_size("size", size) if size is not None else tuple(cam.shape[-2:])
    _check_mask_size(cam.shape[0], H, W)
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
    cam = _check_dae_args(grad, cam)
    beta = C.check_number("beta", beta)
    threshold = _check_threshold(threshold)
    if grad.requires_grad and torch.is_grad_enabled():
        raise ValueError("grad must not require grad: dae_ rescales it in place and has no autograd formula")
    if grad.numel() > 0:
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
    cam, momentum_buffer = _check_step_tensors(param, grad, momentum_buffer, cam, momentum)
    beta = C.check_number("beta", beta)
    threshold = _check_threshold(threshold)
    if param.numel() > 0:
        with torch.no_grad():
            _dae_sgd_step__op(param, grad, momentum_buffer, cam, lr, beta, threshold, momentum, dampening,
                              weight_decay, bool(nesterov), bool(maximize), bool(first_step))
    return param


# ----------------------------------------------------------------------------- registered ops
#
# torch.ops.edfkern.<name>: opaque to torch.compile, checked again here (they may be called
# directly), the kernel chosen at run time by kernel("<name>", device); fake and autograd below.


@torch.library.custom_op("edfkern::dae_mask", mutates_args=())
def _dae_mask_op(cam: Tensor, beta: float, threshold: Optional[float], H: int, W: int) -> Tensor:
    cam = _check_cam(cam, None, None)
    _check_mask_size(cam.shape[0], H, W)
    return kernel("dae_mask", cam.device)(cam.contiguous(), beta, threshold, H, W)


@_dae_mask_op.register_fake
def _dae_mask_fake(cam, beta, threshold, H, W):
    return cam.new_empty((cam.shape[0], 1, H, W))


_dae_mask_op.register_autograd(
    not_differentiable("dae_mask", "cam", "the mask is a step function of the CAM"), setup_context=keep_context)


@torch.library.custom_op("edfkern::dae_", mutates_args=("grad",))
def _dae__op(grad: Tensor, cam: Tensor, beta: float, threshold: Optional[float]) -> None:
    cam = _check_dae_args(grad, cam)
    fn = kernel("dae_", grad.device)
    if grad.is_contiguous():
        fn(grad, cam.contiguous(), beta, threshold)
    else:
        tmp = grad.contiguous()
        fn(tmp, cam.contiguous(), beta, threshold)
        grad.copy_(tmp)


@_dae__op.register_fake
def _dae__fake(grad, cam, beta, threshold):
    return None


@torch.library.custom_op("edfkern::dae_sgd_step_", mutates_args=("param", "momentum_buffer"))
def _dae_sgd_step__op(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], cam: Tensor, lr: float,
                      beta: float, threshold: Optional[float], momentum: float, dampening: float,
                      weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> None:
    cam, momentum_buffer = _check_step_tensors(param, grad, momentum_buffer, cam, momentum)
    fn = kernel("dae_sgd_step_", param.device)
    p = param if param.is_contiguous() else param.contiguous()
    b = momentum_buffer
    if b is not None and not b.is_contiguous():
        b = b.contiguous()
    fn(p, grad.contiguous(), b, cam.contiguous(), lr, beta, threshold, momentum, dampening, weight_decay,
       nesterov, maximize, first_step)
    if p is not param:
        param.copy_(p)
    if b is not momentum_buffer:
        momentum_buffer.copy_(b)


@_dae_sgd_step__op.register_fake
def _dae_sgd_step__fake(param, grad, momentum_buffer, cam, lr, beta, threshold, momentum, dampening, weight_decay,
                        nesterov, maximize, first_step):
    return None


# ----------------------------------------------------------------------------- argument checks


def _check_cam(cam: Tensor, n: Optional[int], device: Optional[torch.device]) -> Tensor:
    """Validate ``cam`` ((N,h,w) or (N,1,h,w)) and return it as (N,h,w)."""
    C.check_float_tensor("cam", cam)
    if cam.dim() == 4 and cam.shape[1] == 1:
        cam = cam[:, 0]
    C.check_rank("cam", cam, (3,), "(N, h, w) or (N, 1, h, w)")
    if n is not None and cam.shape[0] != n:
        raise ValueError(f"cam must have N={n} maps (one per image), got shape {tuple(cam.shape)}")
    if cam.shape[0] == 0 or cam.shape[1] == 0 or cam.shape[2] == 0:
        raise ValueError(f"cam must be non-empty, got shape {tuple(cam.shape)}")
    if device is not None and cam.device != device:
        raise ValueError(f"cam must be on the same device as the gradient ({device}), got {cam.device}")
    return cam


def _check_threshold(threshold: Optional[float]) -> Optional[float]:
    """None or 0 (EDF's ``act_threshold = 0.0``) select the per-image mean; anything else is fixed."""
    if threshold is None:
        return None
    t = C.check_number("threshold", threshold)
    return None if t == 0 else t


def _check_grad(name: str, grad: Tensor) -> None:
    C.check_float_tensor(name, grad)
    C.check_rank(name, grad, (4,), "(N, C, H, W)")


def _check_mask_size(n: int, H: int, W: int) -> None:
    H, W = C.check_size("size", (H, W))
    C.check_numel("the mask", (n, 1, H, W))


def _check_dae_args(grad: Tensor, cam: Tensor) -> Tensor:
    """``dae_``'s tensors: grad (N,C,H,W) with memory of its own, cam (N,h,w) apart from it; returns cam as (N,h,w)."""
    _check_grad("grad", grad)
    cam = _check_cam(cam, grad.shape[0], grad.device)
    C.check_writable("grad", grad)
    C.check_no_alias(("grad",), grad=grad, cam=cam)
    return cam


def _check_step_tensors(param: Tensor, grad: Tensor, momentum_buffer: object, cam: Tensor,
                        momentum: float) -> tuple[Tensor, Optional[Tensor]]:
    """``dae_sgd_step_``'s tensors; returns (cam as (N,h,w), the buffer or None when momentum == 0).

    The written tensors (param, buffer) each own their memory and share none with grad or cam.
    """
    _check_grad("param", param)
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
    cam = _check_cam(cam, param.shape[0], param.device)
    buf = momentum_buffer if momentum != 0 else None
    C.check_writable("param", param)
    if buf is not None:
        C.check_writable("momentum_buffer", buf)
    C.check_no_alias(("param", "momentum_buffer"), param=param, grad=grad, momentum_buffer=buf, cam=cam)
    return cam, buf
