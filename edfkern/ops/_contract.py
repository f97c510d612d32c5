"""Argument checks of the backend kernel contract (``edfkern/reference/__init__.py``), by kernel name.

The registered ``edfkern::`` ops check their own arguments; backends that register their kernels
as ops of their own (``torch.ops.edfkern_triton.*``) run these checks first, so a direct call
with bad tensors gets a ``ValueError``/``TypeError`` instead of an out-of-bounds access. Each rule
has one home, in the op family's file; this table only maps kernel arguments onto them.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .. import _checks as C
from . import covariance as _cov
from . import cpd as _cpd
from . import dae as _dae
from . import features as _feat
from . import gradcam as _cam


def _contiguous(op: str, *tensors) -> None:
    for i, t in enumerate(tensors):
        if isinstance(t, Tensor) and not t.is_contiguous():
            raise ValueError(f"{op}: tensor argument {i} must be contiguous (the kernel contract)")


def _dae_mask(cam, beta, threshold, H, W):
    cam = _dae._check_cam(cam, None, None)
    _dae._check_mask_size(cam.shape[0], H, W)


def _dae_(grad, cam, beta, threshold):
    _dae._check_dae_args(grad, cam)


def _dae_sgd_step_(param, grad, buf, cam, lr, beta, threshold, momentum, dampening, weight_decay, nesterov,
                   maximize, first_step):
    _dae._check_step_tensors(param, grad, buf, cam, C.check_number("momentum", momentum))


def _grad_cam(A, G, A_clean, method, normalize, size):
    _cam._check_args(A, G, A_clean, method, normalize, None if size is None else tuple(size))


def _cpd_forward(student, target, start, k):
    _cpd._check_vectors("cpd_forward", student, target, start)
    _cpd._check_k("cpd_forward", student.numel(), k)


def _cpd_backward(grad_out, student, target, start, thr, tie, sum_d):
    _cpd._check_backward_args("cpd_backward", grad_out, student, target, start, thr, tie, sum_d)


def _cpd_keep_mask(l, k):
    C.check_tensor_arg("cpd_keep_mask", "l", l)
    _cpd._check_k("cpd_keep_mask", l.numel(), k)


def _rows(ndim: int, op: str):
    def check(x, perm, offsets):
        C.check_rows_csr(op, "x", x, ndim, perm, offsets)
    return check


def _cov_backward(x, perm, offsets, mean, M):
    _cov._check_cov_backward_args(x, perm, offsets, mean, M, op="cov_backward")


def _cc_backward(grad_out, x, perm, offsets, mean, coef):
    _feat._check_cc_backward_args("cc_backward", grad_out, x, perm, offsets, mean)


CHECKS: dict[str, Callable[..., None]] = {
    "dae_mask": _dae_mask, "dae_": _dae_, "dae_sgd_step_": _dae_sgd_step_, "grad_cam": _grad_cam,
    "cpd_forward": _cpd_forward, "cpd_backward": _cpd_backward, "cpd_keep_mask": _cpd_keep_mask,
    "cov_forward": _rows(3, "cov_forward"), "cov_backward": _cov_backward, "seg_mean": _rows(2, "seg_mean"),
    "cc_forward": _rows(2, "cc_forward"), "cc_backward": _cc_backward,
}


def check_kernel_args(name: str, *args) -> None:
    """Validate the arguments of contract kernel ``name`` (contiguous tensors, consistent shapes, CSR groups)."""
    CHECKS[name](*args)
    _contiguous(name, *args)


def checked(name: str, fn: Callable) -> Callable:
    """``fn`` (a contract kernel) preceded by :func:`check_kernel_args`."""
    def wrapper(*args):
        check_kernel_args(name, *args)
        return fn(*args)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__wrapped__ = fn
    return wrapper
