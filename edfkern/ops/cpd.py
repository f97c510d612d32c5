"""Common Pattern Dropout (EDF, docs/ops.md).

The element-wise trajectory-matching loss drops its ``k = floor(drop_ratio * P)``
smallest entries (ties: lower indices first, as a stable ascending sort):
``loss = sum_K l / sum_K d`` with ``l = (student - target)^2``, ``d = (start - target)^2``.
The forward saves only two scalars (threshold value and tie index), so backward
rebuilds the keep-set with no P-sized mask in memory.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .._dispatch import kernel
from ._util import keep_context, no_double_backward

# ----------------------------------------------------------------------------- public API


def cpd_trajectory_loss(student: Tensor, target: Tensor, start: Tensor, *, drop_ratio: float,
                        process_group: Optional[object] = None) -> Tensor:
    """EDF's trajectory-matching loss with Common Pattern Dropout.

    Args:
        student: ``(P,)`` flattened student parameters after the synthetic steps (any shape is
            read flat; the gradient has its shape).
        target: ``(P,)`` expert parameters at epoch ``t+M``.
        start: ``(P,)`` expert parameters at epoch ``t``.
        drop_ratio: fraction in ``[0, 1)`` of the smallest ``l`` entries to drop (EDF: 0.25–0.5;
            0 keeps everything).
        process_group: a ``torch.distributed`` process group; each rank then holds one contiguous
            chunk of the flat vector, in rank order (FSDP's layout), and the kept set is exactly that
            of a stable sort over the whole vector (see docs/distributed.md). ``None``: one process.

    Returns:
        Scalar ``sum_K l / sum_K d`` (float32; float64 for float64 inputs). The gradient flows to
        ``student`` only: ``2 (student - target) 1_K / sum_K d``.
    """
    if process_group is not None:
        from ..distributed import cpd_trajectory_loss as sharded
        return sharded(student, target, start, drop_ratio=drop_ratio, process_group=process_group)
    _check_inputs(student, target, start)
    if student.numel() == 0:
        raise ValueError("student must hold at least one parameter (P >= 1), got an empty tensor")
    drop_ratio = _check_ratio(drop_ratio)
    return _cpd_trajectory_loss_op(student, target, start, drop_ratio)[0]


def cpd_keep_mask(l: Tensor, drop_ratio: float, *, process_group: Optional[object] = None) -> Tensor:
    """Keep-set of CPD: ``False`` for the ``floor(drop_ratio * numel)`` smallest entries of ``l``.

    Ties are broken as a stable ascending sort breaks them (lower indices are dropped first).

    Args:
        l: per-element losses, any shape (read flat, row-major).
        drop_ratio: fraction in ``[0, 1)``.
        process_group: a ``torch.distributed`` process group; each rank then holds one contiguous
            chunk of the flat vector, in rank order (FSDP's layout), and the kept set is exactly that
            of a stable sort over the whole vector (see docs/distributed.md). ``None``: one process.

    Returns:
        bool tensor shaped like ``l``.
    """
    if process_group is not None:
        from ..distributed import cpd_keep_mask as sharded
        return sharded(l, drop_ratio, process_group=process_group)
    C.check_float_tensor("l", l)
    drop_ratio = _check_ratio(drop_ratio)
    if l.numel() == 0:
        return torch.ones_like(l, dtype=torch.bool)
    return _cpd_keep_mask_op(l, drop_ratio)


# ----------------------------------------------------------------------------- registered ops
#
# torch.ops.edfkern.<name>: opaque to torch.compile, checked again here (they may be called
# directly: the three vectors agree in size, dtype and device, the scalars are 0-d tensors on that
# device, and drop_ratio keeps k = floor(drop_ratio * P) inside [0, P)), the kernel chosen at run
# time by kernel("<kernel>", device); fake and autograd below.


@torch.library.custom_op("edfkern::cpd_trajectory_loss", mutates_args=())
def _cpd_trajectory_loss_op(student: Tensor, target: Tensor, start: Tensor,
                            drop_ratio: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, thr, tie, sum_d); only ``loss`` is public."""
    _check_vectors("edfkern::cpd_trajectory_loss", student, target, start)
    drop_ratio = _check_ratio(drop_ratio)
    s, t, s0 = (v.reshape(-1).contiguous() for v in (student, target, start))
    sum_l, sum_d, thr, tie = kernel("cpd_forward", s.device)(s, t, s0, _k(drop_ratio, s.numel()))
    return sum_l / sum_d, thr, tie, sum_d


@_cpd_trajectory_loss_op.register_fake
def _cpd_trajectory_loss_fake(student, target, start, drop_ratio):
    acc = C.acc_dtype(student.dtype)
    e = student.new_empty
    return e((), dtype=acc), e((), dtype=acc), e((), dtype=torch.int64), e((), dtype=acc)  # loss, thr, tie, sum_d


def _cpd_trajectory_loss_setup(ctx, inputs, output):
    student, target, start, _ = inputs
    _, thr, tie, sum_d = output
    ctx.save_for_backward(student, target, start, thr, tie, sum_d)


def _cpd_trajectory_loss_autograd(ctx, g_loss, g_thr, g_tie, g_sum_d):
    student, target, start, thr, tie, sum_d = ctx.saved_tensors
    if g_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _cpd_trajectory_loss_backward_op(g_loss, student, target, start, thr, tie, sum_d), None, None, None


_cpd_trajectory_loss_op.register_autograd(_cpd_trajectory_loss_autograd, setup_context=_cpd_trajectory_loss_setup)


@torch.library.custom_op("edfkern::cpd_trajectory_loss_backward", mutates_args=())
def _cpd_trajectory_loss_backward_op(grad: Tensor, student: Tensor, target: Tensor, start: Tensor, thr: Tensor,
                                     tie: Tensor, sum_d: Tensor) -> Tensor:
    _check_backward_args("edfkern::cpd_trajectory_loss_backward", grad, student, target, start, thr, tie, sum_d)
    s, t, s0 = (v.reshape(-1).contiguous() for v in (student, target, start))
    g = kernel("cpd_backward", s.device)(grad, s, t, s0, thr, tie, sum_d)
    return g.view(student.shape)


@_cpd_trajectory_loss_backward_op.register_fake
def _cpd_trajectory_loss_backward_fake(grad, student, target, start, thr, tie, sum_d):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


_cpd_trajectory_loss_backward_op.register_autograd(no_double_backward("cpd_trajectory_loss"),
                                                   setup_context=keep_context)


@torch.library.custom_op("edfkern::cpd_keep_mask", mutates_args=())
def _cpd_keep_mask_op(l: Tensor, drop_ratio: float) -> Tensor:
    C.check_tensor_arg("edfkern::cpd_keep_mask", "l", l)
    drop_ratio = _check_ratio(drop_ratio)
    flat = l.reshape(-1).contiguous()
    return kernel("cpd_keep_mask", flat.device)(flat, _k(drop_ratio, flat.numel())).view(l.shape)


@_cpd_keep_mask_op.register_fake
def _cpd_keep_mask_fake(l, drop_ratio):
    return torch.empty_like(l, dtype=torch.bool, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- argument checks


def _check_ratio(drop_ratio: float) -> float:
    """``drop_ratio`` in ``[0, 1)``. At 1 or above nothing is kept; the message says what EDF's code does then."""
    f = C.check_number("drop_ratio", drop_ratio, lo=0.0)
    if f >= 1.0:
        raise ValueError(
            f"drop_ratio must be < 1.0, got {f}: it would drop every element and leave nothing to match. "
            "EDF's released code (distill/edf_distill.py, whose loss_threshold defaults to 1.0 in utils/cfg.py "
            "for configs that do not set it) would silently skip the update there, with no error: its kept set "
            "is empty, the loss is 0/0 = NaN, and 'grand_loss <= threshold' is never true, so the images are "
            "never updated. "
            "Use the configs' values (0.25-0.5), or 0 to keep every element.")
    return f


def _check_inputs(student: Tensor, target: Tensor, start: Tensor) -> None:
    """The public op's checks of the three vectors: floating, same shape, dtype and device.

    Shared with ``edfkern.distributed``, where a rank's chunk may be empty (the op itself refuses P = 0).
    """
    for name, v in (("student", student), ("target", target), ("start", start)):
        C.check_float_tensor(name, v)
    C.check_shape("target", target, student.shape, "(P,) like student")
    C.check_shape("start", start, student.shape, "(P,) like student")
    C.check_same_dtype(student=student, target=target, start=start)
    C.check_same_device(student=student, target=target, start=start)


def _k(drop_ratio: float, p: int) -> int:
    """The kernels' ``k``: how many of the ``p`` entries are dropped, ``floor(drop_ratio * p)``."""
    return int(math.floor(drop_ratio * p))


def _check_vectors(op: str, student: Tensor, target: Tensor, start: Tensor) -> None:
    for name, v in (("student", student), ("target", target), ("start", start)):
        C.check_tensor_arg(op, name, v, device=student.device)
        if v.numel() != student.numel() or v.dtype != student.dtype:
            raise ValueError(f"{op}: {name} must have student's size {student.numel()} and dtype {student.dtype}, "
                             f"got {v.numel()} {v.dtype}")
    if student.numel() == 0:
        raise ValueError(f"{op}: student must hold at least one parameter")


def _check_backward_args(op: str, grad: Tensor, student: Tensor, target: Tensor, start: Tensor, thr: Tensor,
                         tie: Tensor, sum_d: Tensor) -> None:
    _check_vectors(op, student, target, start)
    for name, v in (("grad", grad), ("thr", thr), ("sum_d", sum_d)):
        _check_scalar_arg(op, name, v, student.device)
    _check_scalar_arg(op, "tie", tie, student.device, dtypes=(torch.int64,))


def _check_scalar_arg(op: str, name: str, t: Tensor, device: torch.device, dtypes=C.FLOAT_DTYPES) -> None:
    C.check_tensor_arg(op, name, t, dtypes=dtypes, device=device)
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one value, got shape {tuple(t.shape)}")
