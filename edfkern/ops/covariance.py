"""Local covariance and covariance matching (IID, docs/ops.md).

``Sigma_k = 1/n_k sum_{i in k} (X_i - Xbar_k)(X_i - Xbar_k)^T`` for conv features
``X_i`` of shape ``(C, L)``, and IID's loss ``w * sum_k ||Sigma_k(real) - Sigma_k(syn)||_F^2``.
Every backward is the analytic ``grad_i = M_k (X_i - Xbar_k)`` with a per-class
``(C, C)`` matrix ``M_k``, computed by one backend kernel.
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


def local_covariance(x: Tensor, *, groups: C.GroupsArg, num_groups: Optional[int] = None,
                     process_group: Optional[object] = None) -> Tensor:
    """Per-class local covariance of conv features: the ``Sigma_k`` of IID's covariance matching constraint.

    Args:
        x: ``(N, C, L)`` features (``L = h*w``); ``(N, C, h, w)`` is flattened, ``(N, D)`` read as ``(N, D, 1)``.
        groups: ``int`` K (N rows in K equal contiguous blocks) or ``(N,)`` integer labels in ``[0, K)``.
        num_groups: K for label groups (default: max label + 1).
        process_group: a ``torch.distributed`` process group over which the rows are sharded; the
            result is then that of the union of every rank's rows, identical on every rank (see
            docs/distributed.md). ``None`` (the default): this process's rows only.

    Returns:
        ``(K, C, C)`` with ``Sigma_k = 1/n_k sum_{i in k} (X_i - Xbar_k)(X_i - Xbar_k)^T`` (divided by
        ``n_k``, not ``n_k - 1`` or ``L``); zeros for an empty group. float32 (float64 for float64 input).
    """
    if is_active(process_group):
        return _multi_rank.local_covariance(x, groups=groups, num_groups=num_groups, process_group=process_group)
    x = C.as_ncl("x", x)
    g = C.resolve_groups(groups, x.shape[0], x.device, num_groups)
    return _local_covariance_op(x, g.perm, g.offsets)[0]


def covariance_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: C.GroupsArg, real_groups: C.GroupsArg,
                             num_groups: Optional[int] = None, weight: float = 0.01,
                             process_group: Optional[object] = None) -> Tensor:
    """IID's covariance matching constraint L_CM: ``weight * sum_k ||Sigma_k(real) - Sigma_k(syn)||_F^2``.

    Args:
        syn: ``(N_syn, C, L)`` synthetic conv features (or ``(N, C, h, w)`` / ``(N, D)``).
        real: ``(N_real, C, L)`` real features, same ``C`` and ``L``; IID detaches them.
        syn_groups, real_groups: ``int`` K or ``(N,)`` labels for each side.
        num_groups: K when both sides are labels (default: max label over both + 1).
        weight: IID uses 0.01 (DM+IID) and 0.03 (IDM+IID).
        process_group: a ``torch.distributed`` process group over which the rows are sharded; the
            result is then that of the union of every rank's rows, identical on every rank (see
            docs/distributed.md). ``None`` (the default): this process's rows only.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs). Gradients reach whichever inputs need them.

    Raises:
        ValueError: a group is empty on either side, or shapes disagree.
    """
    if is_active(process_group):
        return _multi_rank.covariance_matching_loss(syn, real, syn_groups=syn_groups, real_groups=real_groups,
                                                    num_groups=num_groups, weight=weight, process_group=process_group)
    syn, real, weight, gs, gr = C.matching_args(C.as_ncl, syn, real, syn_groups, real_groups, num_groups, weight)
    return _covariance_matching_loss_op(syn, gs.perm, gs.offsets, real, gr.perm, gr.offsets, weight)[0]


# ------------------------------------------------ registered ops (the one checked boundary: see edfkern/ops/__init__.py)


@torch.library.custom_op("edfkern::local_covariance", mutates_args=())
def _local_covariance_op(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (sigma (K,C,C), mean (K,C,L)); ``mean`` is kept for backward."""
    _check_x_csr("edfkern::local_covariance", x, perm, offsets)
    return kernel("cov_forward", x.device)(x.contiguous(), perm, offsets)


@_local_covariance_op.register_fake
def _local_covariance_fake(x, perm, offsets):
    k, (_, c, l) = offsets.shape[0] - 1, x.shape
    acc = C.acc_dtype(x.dtype)
    return x.new_empty((k, c, c), dtype=acc), x.new_empty((k, c, l), dtype=acc)


def _local_covariance_setup(ctx, inputs, output):
    x, perm, offsets = inputs
    ctx.save_for_backward(x, perm, offsets, output[1])


def _local_covariance_autograd(ctx, g_sigma, g_mean):
    x, perm, offsets, mean = ctx.saved_tensors
    if g_sigma is None:
        return None, None, None
    M = _grads.local_covariance_coef(g_sigma, offsets.diff())
    return _covariance_backward_op(x, perm, offsets, mean, M), None, None


_local_covariance_op.register_autograd(_local_covariance_autograd, setup_context=_local_covariance_setup)


@torch.library.custom_op("edfkern::covariance_backward", mutates_args=())
def _covariance_backward_op(x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor, M: Tensor) -> Tensor:
    """grad_i = M_k (x_i - mean_k) for every row i of group k: (N,C,L) in x.dtype."""
    _check_cov_backward_args(x, perm, offsets, mean, M)
    return kernel("cov_backward", x.device)(x.contiguous(), perm, offsets, mean.contiguous(), M.contiguous())


@_covariance_backward_op.register_fake
def _covariance_backward_fake(x, perm, offsets, mean, M):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_covariance_backward_op.register_autograd(no_double_backward("local_covariance"), setup_context=keep_context)


@torch.library.custom_op("edfkern::covariance_matching_loss", mutates_args=())
def _covariance_matching_loss_op(syn: Tensor, syn_perm: Optional[Tensor], syn_offsets: Tensor, real: Tensor,
                                 real_perm: Optional[Tensor], real_offsets: Tensor, weight: float
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, sigma_syn, sigma_real, mean_syn, mean_real); only ``loss`` is public."""
    op = "edfkern::covariance_matching_loss"
    C.check_pair_tensors(syn, real, "(C, L)")
    ks = _check_x_csr(op, syn, syn_perm, syn_offsets, "syn", nonempty=True)
    kr = _check_x_csr(op, real, real_perm, real_offsets, "real", nonempty=True)
    if ks != kr:
        raise ValueError(f"{op}: syn and real must have the same number of groups, got K={ks} and K={kr}")
    fwd = kernel("cov_forward", syn.device)
    s_syn, m_syn = fwd(syn.contiguous(), syn_perm, syn_offsets)
    s_real, m_real = fwd(real.contiguous(), real_perm, real_offsets)
    diff = s_real - s_syn
    return weight * (diff * diff).sum(), s_syn, s_real, m_syn, m_real


@_covariance_matching_loss_op.register_fake
def _covariance_matching_loss_fake(syn, syn_perm, syn_offsets, real, real_perm, real_offsets, weight):
    C.check_pair_tensors(syn, real, "(C, L)")
    k, (_, c, l) = syn_offsets.shape[0] - 1, syn.shape
    acc = C.acc_dtype(syn.dtype)
    e = syn.new_empty
    return (e((), dtype=acc), e((k, c, c), dtype=acc), e((k, c, c), dtype=acc), e((k, c, l), dtype=acc),
            e((k, c, l), dtype=acc))


def _covariance_matching_loss_setup(ctx, inputs, output):
    syn, syn_perm, syn_offsets, real, real_perm, real_offsets, weight = inputs
    _, s_syn, s_real, m_syn, m_real = output
    ctx.weight = weight
    ctx.save_for_backward(syn, syn_perm, syn_offsets, real, real_perm, real_offsets, s_syn, s_real, m_syn, m_real)


def _covariance_matching_loss_autograd(ctx, g, *_aux):
    syn, syn_perm, syn_offsets, real, real_perm, real_offsets, s_syn, s_real, m_syn, m_real = ctx.saved_tensors
    grads = [None] * 7
    if g is None:
        return tuple(grads)
    m_s, m_r = _grads.covariance_matching_coefs(g, ctx.weight, s_syn, s_real, syn_offsets.diff(), real_offsets.diff())
    if ctx.needs_input_grad[0]:
        grads[0] = _covariance_backward_op(syn, syn_perm, syn_offsets, m_syn, m_s)
    if ctx.needs_input_grad[3]:
        grads[3] = _covariance_backward_op(real, real_perm, real_offsets, m_real, m_r)
    return tuple(grads)


_covariance_matching_loss_op.register_autograd(_covariance_matching_loss_autograd,
                                               setup_context=_covariance_matching_loss_setup)


# ----------------------------------------------------------------------------- argument checks and helpers


def _check_x_csr(op: str, x: Tensor, perm: Optional[Tensor], offsets: Tensor, side: str = "",
                 nonempty: bool = False) -> int:
    return C.check_rows_csr(op, side or "x", x, 3, perm, offsets, side, nonempty=nonempty)


def _check_cov_backward_args(x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor, M: Tensor) -> None:
    op = "edfkern::covariance_backward"
    k = _check_x_csr(op, x, perm, offsets)
    _, c, l = x.shape
    C.check_tensor_arg(op, "mean", mean, device=x.device)
    C.check_tensor_arg(op, "M", M, device=x.device)
    C.check_shape_arg(op, "mean", mean, (k, c, l))
    C.check_shape_arg(op, "M", M, (k, c, c))
