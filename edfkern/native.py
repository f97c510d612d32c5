"""The ``native`` backend: the kernel contract (edfkern/reference/__init__.py) on ``edfkern._C``.

Each function calls ``torch.ops.edfkern_native.<name>``; the C++ CPU kernels and, when built with
CUDA, the CUDA kernels are registered there. Fake implementations are registered for every op
so ``torch.compile`` can trace a direct call. Importing this module builds the extension if
needed (the registry only imports it once the probe has succeeded).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _extension
from ._checks import acc_dtype

_mod, _why = _extension.load()
if _mod is None:
    raise ImportError(f"edfkern native extension unavailable: {_why}")

_ops = torch.ops.edfkern_native

__all__ = [
    "dae_mask", "dae_", "dae_sgd_step_", "grad_cam", "cpd_forward", "cpd_backward", "cpd_keep_mask",
    "cov_forward", "cov_backward", "seg_mean", "cc_forward", "cc_backward",
]


def _f(v: Optional[float]) -> Optional[float]:
    return None if v is None else float(v)


# ----------------------------------------------------------------------------- DAE


def dae_mask(cam: Tensor, beta: float, threshold: Optional[float], H: int, W: int) -> Tensor:
    return _ops.dae_mask(cam, float(beta), _f(threshold), int(H), int(W))


def dae_(grad: Tensor, cam: Tensor, beta: float, threshold: Optional[float]) -> None:
    _ops.dae_(grad, cam, float(beta), _f(threshold))


def dae_sgd_step_(param: Tensor, grad: Tensor, buf: Optional[Tensor], cam: Tensor, lr: float, beta: float,
                  threshold: Optional[float], momentum: float, dampening: float, weight_decay: float,
                  nesterov: bool, maximize: bool, first_step: bool) -> None:
    _ops.dae_sgd_step_(param, grad, buf, cam, float(lr), float(beta), _f(threshold),
                       float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
                       bool(first_step))


# ----------------------------------------------------------------------------- Grad-CAM


def grad_cam(A: Tensor, G: Tensor, A_clean: Optional[Tensor], method: str, normalize: bool,
             size: Optional[tuple[int, int]]) -> Tensor:
    return _ops.grad_cam(A, G, A_clean, method, bool(normalize), None if size is None else [int(s) for s in size])


# ----------------------------------------------------------------------------- CPD


def cpd_forward(student: Tensor, target: Tensor, start: Tensor, k: int):
    return tuple(_ops.cpd_forward(student, target, start, int(k)))


def cpd_backward(grad_out: Tensor, student: Tensor, target: Tensor, start: Tensor, thr: Tensor, tie: Tensor,
                 sum_d: Tensor) -> Tensor:
    return _ops.cpd_backward(grad_out, student, target, start, thr, tie, sum_d)


def cpd_keep_mask(l: Tensor, k: int) -> Tensor:
    return _ops.cpd_keep_mask(l, int(k))


# ----------------------------------------------------------------------------- covariance


def cov_forward(x: Tensor, perm: Optional[Tensor], offsets: Tensor):
    return tuple(_ops.cov_forward(x, perm, offsets))


def cov_backward(x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor, M: Tensor) -> Tensor:
    return _ops.cov_backward(x, perm, offsets, mean, M)


# ----------------------------------------------------------------------------- flat features


def seg_mean(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> Tensor:
    return _ops.seg_mean(x, perm, offsets)


def cc_forward(x: Tensor, perm: Optional[Tensor], offsets: Tensor):
    return tuple(_ops.cc_forward(x, perm, offsets))


def cc_backward(grad_out: Tensor, x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor,
                coef: float) -> Tensor:
    return _ops.cc_backward(grad_out, x, perm, offsets, mean, float(coef))


# ----------------------------------------------------------------------------- fake (meta) implementations


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("edfkern_native::dae_mask")
    def _(cam, beta, threshold, H, W):
        return cam.new_empty((cam.shape[0], 1, H, W))

    @reg("edfkern_native::dae_")
    def _(grad, cam, beta, threshold):
        return None

    @reg("edfkern_native::dae_sgd_step_")
    def _(param, grad, buf, cam, lr, beta, threshold, momentum, dampening, weight_decay, nesterov, maximize,
          first_step):
        return None

    @reg("edfkern_native::grad_cam")
    def _(A, G, A_clean, method, normalize, size):
        n, h, w = A.shape[-4], A.shape[-2], A.shape[-1]
        hh, ww = (h, w) if size is None else size
        return A.new_empty((n, hh, ww), dtype=acc_dtype(A.dtype))

    @reg("edfkern_native::cpd_forward")
    def _(student, target, start, k):
        e = student.new_empty((), dtype=acc_dtype(student.dtype))
        return e, e.clone(), e.clone(), student.new_empty((), dtype=torch.int64)

    @reg("edfkern_native::cpd_backward")
    def _(grad_out, student, target, start, thr, tie, sum_d):
        return torch.empty_like(student)

    @reg("edfkern_native::cpd_keep_mask")
    def _(l, k):
        return torch.empty_like(l, dtype=torch.bool)

    @reg("edfkern_native::cov_forward")
    def _(x, perm, offsets):
        k, (_, c, l) = offsets.shape[0] - 1, x.shape
        acc = acc_dtype(x.dtype)
        return x.new_empty((k, c, c), dtype=acc), x.new_empty((k, c, l), dtype=acc)

    @reg("edfkern_native::cov_backward")
    def _(x, perm, offsets, mean, M):
        return torch.empty_like(x)

    @reg("edfkern_native::seg_mean")
    def _(x, perm, offsets):
        return x.new_empty((offsets.shape[0] - 1, x.shape[1]), dtype=acc_dtype(x.dtype))

    @reg("edfkern_native::cc_forward")
    def _(x, perm, offsets):
        acc = acc_dtype(x.dtype)
        return x.new_empty((), dtype=acc), x.new_empty((offsets.shape[0] - 1, x.shape[1]), dtype=acc)

    @reg("edfkern_native::cc_backward")
    def _(grad_out, x, perm, offsets, mean, coef):
        return torch.empty_like(x)


_register_fakes()
