"""Class centralization and mean matching on flat features (IID and DM, docs/ops.md).

Both are segmented reductions over the rows of each class:
CC ``w * sum_k sum_{i in k} ||f_i - mu_k||^2`` (IID's released linear form) and
DM ``w * sum_k ||mean_real_k - mean_syn_k||^2``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .. import _grads
from .._dispatch import kernel
from ..distributed import features as _multi_rank
from ..distributed._comm import is_active
from ._util import keep_context, no_double_backward

# ----------------------------------------------------------------------------- public API


def class_centralization_loss(feat: Tensor, *, groups: C.GroupsArg, num_groups: Optional[int] = None,
                              weight: float = 0.05, process_group: Optional[object] = None) -> Tensor:
    """IID's class centralization constraint L_CC, in the released code's linear form.

    (The paper's exponential form with beta = 0.)

    Args:
        feat: ``(N, D)`` features (IID: 512-d ResNet-18 features); other shapes are flattened per row.
        groups: ``int`` K or ``(N,)`` integer labels.
        num_groups: K for label groups (default: max label + 1).
        weight: 0.05 by default; IDM+IID uses 0.01.
        process_group: a ``torch.distributed`` process group over which the rows are sharded; the
            result is then that of the union of every rank's rows, identical on every rank (see
            docs/distributed.md). ``None`` (the default): this process's rows only.

    Returns:
        Scalar ``weight * sum_k sum_{i in k} ||f_i - mu_k||^2``; gradient ``2 * weight * (f_i - mu_k)``.
    """
    if is_active(process_group):
        return _multi_rank.class_centralization_loss(feat, groups=groups, num_groups=num_groups, weight=weight,
                                                     process_group=process_group)
    x = C.as_rows("feat", feat)
    weight = C.check_number("weight", weight)
    g = C.resolve_groups(groups, x.shape[0], x.device, num_groups, k_max=x.shape[0])
    C.require_nonempty(g, "feat")
    return _class_centralization_loss_op(x, g.perm, g.offsets, weight)[0]


def mean_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: C.GroupsArg, real_groups: C.GroupsArg,
                       num_groups: Optional[int] = None, weight: float = 1.0,
                       process_group: Optional[object] = None) -> Tensor:
    """DM's distribution (mean) matching loss: ``weight * sum_k ||mean_real_k - mean_syn_k||^2``.

    Args:
        syn: ``(N_syn, D)`` synthetic embeddings (other shapes flattened per row).
        real: ``(N_real, D)`` real embeddings.
        syn_groups, real_groups: ``int`` K or ``(N,)`` labels for each side.
        num_groups: K when both sides are labels.
        weight: scale (DM: 1).
        process_group: a ``torch.distributed`` process group over which the rows are sharded; the
            result is then that of the union of every rank's rows, identical on every rank (see
            docs/distributed.md). ``None`` (the default): this process's rows only.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    if is_active(process_group):
        return _multi_rank.mean_matching_loss(syn, real, syn_groups=syn_groups, real_groups=real_groups,
                                              num_groups=num_groups, weight=weight, process_group=process_group)
    syn, real, weight, gs, gr = C.matching_args(C.as_rows, syn, real, syn_groups, real_groups, num_groups, weight)
    return _mean_matching_loss_op(syn, gs.perm, gs.offsets, real, gr.perm, gr.offsets, weight)[0]


# ------------------------------------------------ registered ops (the one checked boundary: see edfkern/ops/__init__.py)


@torch.library.custom_op("edfkern::class_centralization_loss", mutates_args=())
def _class_centralization_loss_op(feat: Tensor, perm: Optional[Tensor], offsets: Tensor,
                                  weight: float) -> tuple[Tensor, Tensor]:
    """Returns (loss, mean (K,D)); ``mean`` is kept for backward."""
    C.check_rows_csr("edfkern::class_centralization_loss", "feat", feat, 2, perm, offsets, nonempty=True)
    sq, mean = kernel("cc_forward", feat.device)(feat.contiguous(), perm, offsets)
    return weight * sq, mean


@_class_centralization_loss_op.register_fake
def _class_centralization_loss_fake(feat, perm, offsets, weight):
    acc = C.acc_dtype(feat.dtype)
    return feat.new_empty((), dtype=acc), feat.new_empty((offsets.shape[0] - 1, feat.shape[1]), dtype=acc)


def _class_centralization_loss_setup(ctx, inputs, output):
    feat, perm, offsets, weight = inputs
    ctx.weight = weight
    ctx.save_for_backward(feat, perm, offsets, output[1])


def _class_centralization_loss_autograd(ctx, g, _g_mean):
    feat, perm, offsets, mean = ctx.saved_tensors
    if g is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _class_centralization_backward_op(g, feat, perm, offsets, mean, 2.0 * ctx.weight), None, None, None


_class_centralization_loss_op.register_autograd(_class_centralization_loss_autograd,
                                                setup_context=_class_centralization_loss_setup)


@torch.library.custom_op("edfkern::class_centralization_backward", mutates_args=())
def _class_centralization_backward_op(grad: Tensor, feat: Tensor, perm: Optional[Tensor], offsets: Tensor,
                                      mean: Tensor, coef: float) -> Tensor:
    """coef * grad * (f_i - mu_k), (N,D) in feat.dtype."""
    _check_cc_backward_args(grad, feat, perm, offsets, mean)
    return kernel("cc_backward", feat.device)(grad, feat.contiguous(), perm, offsets, mean, coef)


@_class_centralization_backward_op.register_fake
def _class_centralization_backward_fake(grad, feat, perm, offsets, mean, coef):
    return torch.empty_like(feat, memory_format=torch.contiguous_format)


_class_centralization_backward_op.register_autograd(no_double_backward("class_centralization_loss"),
                                                    setup_context=keep_context)


@torch.library.custom_op("edfkern::mean_matching_loss", mutates_args=())
def _mean_matching_loss_op(syn: Tensor, syn_perm: Optional[Tensor], syn_offsets: Tensor, real: Tensor,
                           real_perm: Optional[Tensor], real_offsets: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """Returns (loss, mean_syn - mean_real (K,D)); the difference is kept for backward."""
    op = "edfkern::mean_matching_loss"
    C.check_pair_tensors(syn, real, "feature size D")
    ks = C.check_rows_csr(op, "syn", syn, 2, syn_perm, syn_offsets, "syn", nonempty=True)
    kr = C.check_rows_csr(op, "real", real, 2, real_perm, real_offsets, "real", nonempty=True)
    if ks != kr:
        raise ValueError(f"{op}: syn and real must have the same number of groups, got K={ks} and K={kr}")
    mean = kernel("seg_mean", syn.device)
    diff = mean(syn.contiguous(), syn_perm, syn_offsets) - mean(real.contiguous(), real_perm, real_offsets)
    return weight * (diff * diff).sum(), diff


@_mean_matching_loss_op.register_fake
def _mean_matching_loss_fake(syn, syn_perm, syn_offsets, real, real_perm, real_offsets, weight):
    C.check_pair_tensors(syn, real, "feature size D")
    acc = C.acc_dtype(syn.dtype)
    return syn.new_empty((), dtype=acc), syn.new_empty((syn_offsets.shape[0] - 1, syn.shape[1]), dtype=acc)


def _mean_matching_loss_setup(ctx, inputs, output):
    syn, syn_perm, syn_offsets, real, real_perm, real_offsets, weight = inputs
    ctx.weight, ctx.n_syn, ctx.n_real = weight, syn.shape[0], real.shape[0]
    ctx.dtypes = (syn.dtype, real.dtype)
    ctx.save_for_backward(syn_perm, syn_offsets, real_perm, real_offsets, output[1])


def _mean_matching_loss_autograd(ctx, g, _g_diff):
    syn_perm, syn_offsets, real_perm, real_offsets, diff = ctx.saved_tensors
    grads = [None] * 7
    if g is None:
        return tuple(grads)
    w2 = 2.0 * ctx.weight  # dL/dmean_syn_k = 2w (mean_syn_k - mean_real_k)
    if ctx.needs_input_grad[0]:
        grads[0] = _mean_matching_backward_op(g, diff, syn_perm, syn_offsets, ctx.n_syn, w2, ctx.dtypes[0])
    if ctx.needs_input_grad[3]:
        grads[3] = _mean_matching_backward_op(g, diff, real_perm, real_offsets, ctx.n_real, -w2, ctx.dtypes[1])
    return tuple(grads)


_mean_matching_loss_op.register_autograd(_mean_matching_loss_autograd, setup_context=_mean_matching_loss_setup)


@torch.library.custom_op("edfkern::mean_matching_backward", mutates_args=())
def _mean_matching_backward_op(grad: Tensor, diff: Tensor, perm: Optional[Tensor], offsets: Tensor, n: int,
                               coef: float, dtype: torch.dtype) -> Tensor:
    """Row i of group k gets ``coef * grad * diff_k / n_k``: (n, D) in ``dtype``.

    Plain torch ops (no backend kernel): one scale and one gather per call.
    """
    op = "edfkern::mean_matching_backward"
    if dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype, got {dtype}")
    n = C.check_int("n", n, lo=0, hi=C.MAX_NUMEL)
    C.check_tensor_arg(op, "diff", diff, dims=(2,))
    C.check_tensor_arg(op, "grad", grad, dims=(0,), device=diff.device)
    k = C.check_csr(op, n, perm, offsets, diff.device)
    C.check_shape_arg(op, "diff", diff, (k, diff.shape[1]))
    return _grads.mean_matching_rows(grad, coef, diff, offsets.diff(), C.row_labels(perm, offsets, n), dtype)


@_mean_matching_backward_op.register_fake
def _mean_matching_backward_fake(grad, diff, perm, offsets, n, coef, dtype):
    return diff.new_empty((n, diff.shape[1]), dtype=dtype)


_mean_matching_backward_op.register_autograd(no_double_backward("mean_matching_loss"), setup_context=keep_context)


# ----------------------------------------------------------------------------- argument checks and helpers


def _check_cc_backward_args(grad: Tensor, feat: Tensor, perm: Optional[Tensor], offsets: Tensor,
                            mean: Tensor) -> None:
    op = "edfkern::class_centralization_backward"
    k = C.check_rows_csr(op, "feat", feat, 2, perm, offsets)
    C.check_tensor_arg(op, "grad", grad, dims=(0,), device=feat.device)
    C.check_tensor_arg(op, "mean", mean, device=feat.device)
    C.check_shape_arg(op, "mean", mean, (k, feat.shape[1]))
