"""Common Pattern Dropout (EDF, docs/ops.md).

The element-wise trajectory-matching loss drops its ``k = floor(drop_ratio * P)``
smallest entries (ties: lower indices first, as a stable ascending sort):
``loss = sum_K l / sum_K d`` with ``l = (student - target)^2``, ``d = (start - target)^2``.
The forward saves only two scalars (threshold value and tie index), so backward
rebuilds the keep-set with no P-sized mask in memory.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .._dispatch import kernel
from ..distributed import cpd as _multi_rank
from ..distributed._comm import is_active
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
    if is_active(process_group):
        return _multi_rank.cpd_trajectory_loss(student, target, start, drop_ratio=drop_ratio,
                                               process_group=process_group)
    for name, v in (("student", student), ("target", target), ("start", start)):
        C.check_tensor(name, v)
    return _cpd_trajectory_loss_op(student, target, start, C.as_float("drop_ratio", drop_ratio))[0]


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
    if is_active(process_group):
        return _multi_rank.cpd_keep_mask(l, drop_ratio, process_group=process_group)
    C.check_tensor("l", l)
    return _cpd_keep_mask_op(l, C.as_float("drop_ratio", drop_ratio))


# ------------------------------------------------ registered ops (the one checked boundary: see edfkern/ops/__init__.py)


@torch.library.custom_op("edfkern::cpd_trajectory_loss", mutates_args=())
def _cpd_trajectory_loss_op(student: Tensor, target: Tensor, start: Tensor,
                            drop_ratio: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, thr, tie, sum_d); only ``loss`` is public."""
    drop_ratio = _check_loss_args(student, target, start, drop_ratio)
    s, t, s0 = (v.reshape(-1).contiguous() for v in (student, target, start))
    sum_l, sum_d, thr, tie = kernel("cpd_forward", s.device)(s, t, s0, C.drop_count(drop_ratio, s.numel()))
    return sum_l / sum_d, thr, tie, sum_d


@_cpd_trajectory_loss_op.register_fake
def _cpd_trajectory_loss_fake(student, target, start, drop_ratio):
    _check_loss_args(student, target, start, drop_ratio)
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
    C.check_float_tensor("l", l)
    drop_ratio = C.check_drop_ratio(drop_ratio)
    if l.numel() == 0:
        return torch.ones(l.shape, dtype=torch.bool, device=l.device)
    flat = l.reshape(-1).contiguous()
    return kernel("cpd_keep_mask", flat.device)(flat, C.drop_count(drop_ratio, flat.numel())).view(l.shape)


@_cpd_keep_mask_op.register_fake
def _cpd_keep_mask_fake(l, drop_ratio):
    C.check_float_tensor("l", l)
    C.check_drop_ratio(drop_ratio)
    return torch.empty_like(l, dtype=torch.bool, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- argument checks


def _check_loss_args(student: Tensor, target: Tensor, start: Tensor, drop_ratio: float) -> float:
    """The loss's rules: three floating vectors of one shape, dtype and device, P >= 1, drop_ratio in [0, 1)."""
    C.check_cpd_vectors(student, target, start)
    if student.numel() == 0:
        raise ValueError("student must hold at least one parameter (P >= 1), got an empty tensor")
    return C.check_drop_ratio(drop_ratio)


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
