"""Row-sharded IID and DM ops: the statistics of the union of every rank's rows.

Each op runs, on every rank:

1. every local check (types, ranks of tensors, ``weight``, the labels, the kernels of the selected
   backend), then one small header collective in which the ranks agree on the op, dtypes, shapes,
   the number of groups and the label ranges, and learn whether any rank's local checks failed
   (:mod:`edfkern.distributed._agree`);
2. the local part with the selected backend's kernels (reference, native or triton);
3. the merge of :mod:`edfkern.distributed.stats`: one all-reduce of per-class sums and counts (the
   global mean), then one of each rank's scatter about that global mean, after which every rank
   holds bit-identical statistics and loss.

Backward adds no collective: the gradient of a row needs only the global statistics saved in
forward, because the rows of a class, centred on the global mean, sum to zero over all ranks.
A row gets the gradient of the loss its own rank computed; since every rank computes the same loss,
that is the single-process gradient of the union.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .. import _grads
from .._dispatch import kernel
from . import _comm
from ._agree import Side, agree, collective_op
from .stats import centred, global_mean, local_class_sums, require_nonempty, scatter_of_centred

__all__ = ["local_covariance", "covariance_matching_loss", "class_centralization_loss", "mean_matching_loss"]


def _resolve(sides: list[Side], k: int) -> list[C.Groups]:
    """CSR groups of every side with the agreed ``K`` (its bounds and the label ranges are checked in
    the header already, so nothing here fails on one rank only)."""
    return [C.resolve_groups(s.groups, s.x.shape[0], s.x.device, k, s.name, k_max=k) for s in sides]


def _require_kernels(device: torch.device, *names: str) -> None:
    """Look up the forward kernels before the header: a backend that cannot run here fails every rank."""
    for name in names:
        kernel(name, device)


# ----------------------------------------------------------------------------- covariance: two rounds, any sides


def _cov_merge(xs: list[Tensor], gs: list[C.Groups], require: list[Optional[str]], group
               ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Global ``(Sigma, mu, n)`` of every side, in two all-reduces shared by the sides."""
    local = [local_class_sums(s or "x", x, g) for x, g, s in zip(xs, gs, require)]
    _comm.all_reduce_sum_([t for _, sums, n in local for t in (sums, n)], group=group, what="class sums")
    mus = [global_mean(sums, n) for _, sums, n in local]
    for (_, _, n), side in zip(local, require):
        if side is not None:
            require_nonempty(n, side)
    scatter = []
    for x, g, mu in zip(xs, gs, mus):
        k, c = g.num_groups, x.shape[1]
        if x.shape[0] == 0:
            scatter.append(mu.new_zeros((k, c, c)))
            continue
        sigma_c, mean_c = kernel("cov_forward", x.device)(centred(x, g, mu).contiguous(), g.perm, g.offsets)
        scatter.append(scatter_of_centred(sigma_c, mean_c, g.offsets.diff().to(mu.dtype)))
    _comm.all_reduce_sum_(scatter, group=group, what="class scatter")
    return [(s * _grads.inv_counts(n)[:, None, None], mu, n) for s, mu, (_, _, n) in zip(scatter, mus, local)]


def _cov_grad(x: Tensor, g: C.Groups, mu: Tensor, M: Tensor) -> Tensor:
    """``M_k (x_i - mu_k)`` for this rank's rows (the ``cov_backward`` kernel, with the global mean)."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    return kernel("cov_backward", x.device)(x.contiguous(), g.perm, g.offsets, mu.contiguous(), M.contiguous())


class _LocalCov(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, group):
        (sigma, mu, n), = _cov_merge([x], [g], [None], group)
        ctx.g, ctx.mu, ctx.n = g, mu, n
        ctx.save_for_backward(x)
        return sigma

    @staticmethod
    def backward(ctx, g_sigma):
        x, = ctx.saved_tensors
        M = _grads.local_covariance_coef(g_sigma, ctx.n)
        return _cov_grad(x, ctx.g, ctx.mu, M.to(ctx.mu.dtype)), None, None


class _CovMatching(torch.autograd.Function):
    @staticmethod
    def forward(ctx, syn, real, gs, gr, weight, group):
        (s_syn, m_syn, n_syn), (s_real, m_real, n_real) = _cov_merge([syn, real], [gs, gr], ["syn", "real"], group)
        ctx.save_for_backward(syn, real)
        ctx.gs, ctx.gr, ctx.weight = gs, gr, weight
        ctx.stats = (s_syn, m_syn, n_syn, s_real, m_real, n_real)
        diff = s_real - s_syn
        return weight * (diff * diff).sum()

    @staticmethod
    def backward(ctx, g):
        syn, real = ctx.saved_tensors
        s_syn, m_syn, n_syn, s_real, m_real, n_real = ctx.stats
        m_s, m_r = _grads.covariance_matching_coefs(g, ctx.weight, s_syn, s_real, n_syn, n_real)
        g_syn = _cov_grad(syn, ctx.gs, m_syn, m_s) if ctx.needs_input_grad[0] else None
        g_real = _cov_grad(real, ctx.gr, m_real, m_r) if ctx.needs_input_grad[1] else None
        return g_syn, g_real, None, None, None, None


# ----------------------------------------------------------------------------- flat features


class _CentralLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, weight, group):
        _, sums, counts = local_class_sums("feat", x, g)
        _comm.all_reduce_sum_([sums, counts], group=group, what="class sums")
        require_nonempty(counts, "feat")
        mu = global_mean(sums, counts)
        total = mu.new_zeros(1)
        if x.shape[0]:  # sum_i ||f_i - mu||^2 = M2 about the local mean of the centred rows + n_r ||m_c||^2
            sq, mean_c = kernel("cc_forward", x.device)(centred(x, g, mu).contiguous(), g.perm, g.offsets)
            total += sq + ((mean_c * mean_c).sum(1) * g.offsets.diff().to(mu.dtype)).sum()
        _comm.all_reduce_sum_([total], group=group, what="class scatter")
        ctx.save_for_backward(x)
        ctx.g, ctx.mu, ctx.weight = g, mu, weight
        return weight * total[0]

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        if x.shape[0] == 0:
            return torch.zeros_like(x), None, None, None
        gx = kernel("cc_backward", x.device)(grad.to(ctx.mu.dtype), x.contiguous(), ctx.g.perm, ctx.g.offsets, ctx.mu,
                                            2.0 * ctx.weight)
        return gx, None, None, None


class _MeanMatching(torch.autograd.Function):
    @staticmethod
    def forward(ctx, syn, real, gs, gr, weight, group):
        _, sums_s, n_s = local_class_sums("syn", syn, gs)
        _, sums_r, n_r = local_class_sums("real", real, gr)
        _comm.all_reduce_sum_([sums_s, n_s, sums_r, n_r], group=group, what="class sums")
        require_nonempty(n_s, "syn")
        require_nonempty(n_r, "real")
        diff = global_mean(sums_s, n_s) - global_mean(sums_r, n_r)
        ctx.gs, ctx.gr, ctx.weight, ctx.diff, ctx.n = gs, gr, weight, diff, (n_s, n_r)
        ctx.rows, ctx.dtypes = (syn.shape[0], real.shape[0]), (syn.dtype, real.dtype)
        return weight * (diff * diff).sum()

    @staticmethod
    def backward(ctx, g):
        out = []
        for i, (grp, n, sign) in enumerate(((ctx.gs, ctx.n[0], 1.0), (ctx.gr, ctx.n[1], -1.0))):
            if not ctx.needs_input_grad[i]:
                out.append(None)
                continue
            labels = C.row_labels(grp.perm, grp.offsets, ctx.rows[i])
            out.append(_grads.mean_matching_rows(g, sign * 2.0 * ctx.weight, ctx.diff, n, labels, ctx.dtypes[i]))
        return out[0], out[1], None, None, None, None


# ----------------------------------------------------------------------------- public functions


def _pair(what: str, syn: Tensor, real: Tensor, syn_groups, real_groups, num_groups, weight, kernels):
    """The two-sided losses' prologue: local checks, then one header exchange (K, shapes, weight) that
    every rank passes or fails together. Returns ``(weight, syn CSR groups, real CSR groups)``."""
    C.check_same_dtype(syn=syn, real=real)
    C.check_same_device(syn=syn, real=real)
    weight = C.check_number("weight", weight)
    _require_kernels(syn.device, *kernels)
    sides = [Side("syn_groups", syn, syn_groups, num_groups), Side("real_groups", real, real_groups, num_groups)]
    k, _ = agree(sides, {"weight": weight}, what=what, allow_empty_groups=False)
    gs, gr = _resolve(sides, k)
    return weight, gs, gr


@collective_op()
def local_covariance(x: Tensor, *, groups: C.GroupsArg, num_groups: Optional[int] = None,
                     process_group) -> Tensor:
    """:func:`edfkern.local_covariance` of the union of every rank's rows.

    Args:
        x: this rank's ``(N_r, C, L)`` rows (``N_r`` may be 0; ``(N, C, h, w)`` and ``(N, D)`` as in
            the single-process op). ``C`` and ``L`` must agree across ranks.
        groups: this rank's ``(N_r,)`` labels, or an int ``K`` (this rank's rows in K equal blocks).
        num_groups: K (default: the largest label on any rank + 1).
        process_group: the ``torch.distributed`` group. An inactive one (``None``, or no initialised
            default group) runs this algorithm on this process's rows alone.

    Returns:
        ``(K, C, C)``, identical on every rank: ``Sigma_k`` over all ranks' rows of class ``k``,
        divided by the global ``n_k``; zeros for a class with no row anywhere.
    """
    x = C.as_ncl("x", x, empty_rows=True)
    _require_kernels(x.device, "seg_mean", "cov_forward")
    sides = [Side("groups", x, groups, num_groups)]
    k, _ = agree(sides, {}, what="local_covariance", allow_empty_groups=True)
    g, = _resolve(sides, k)
    return _LocalCov.apply(x, g, process_group)


@collective_op()
def covariance_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: C.GroupsArg, real_groups: C.GroupsArg,
                             num_groups: Optional[int] = None, weight: float = 0.01, process_group) -> Tensor:
    """:func:`edfkern.covariance_matching_loss` with both sides' rows spread over the ranks.

    ``weight * sum_k ||Sigma_k(real) - Sigma_k(syn)||_F^2`` with the global ``Sigma_k``; the same value
    on every rank. ``ValueError`` on every rank if a class has no row on either side on any rank.
    """
    syn, real = C.as_ncl("syn", syn, empty_rows=True), C.as_ncl("real", real, empty_rows=True)
    weight, gs, gr = _pair("covariance_matching_loss", syn, real, syn_groups, real_groups, num_groups, weight,
                           ("seg_mean", "cov_forward"))
    return _CovMatching.apply(syn, real, gs, gr, weight, process_group)


@collective_op()
def class_centralization_loss(feat: Tensor, *, groups: C.GroupsArg, num_groups: Optional[int] = None,
                              weight: float = 0.05, process_group) -> Tensor:
    """:func:`edfkern.class_centralization_loss` with the rows spread over the ranks.

    ``weight * sum_k sum_{i in k} ||f_i - mu_k||^2`` with the global class means ``mu_k``; the same value
    on every rank. Gradient ``2 weight (f_i - mu_k)`` for this rank's rows.
    """
    x = C.as_rows("feat", feat, empty_rows=True)
    weight = C.check_number("weight", weight)
    _require_kernels(x.device, "seg_mean", "cc_forward")
    sides = [Side("groups", x, groups, num_groups)]
    k, _ = agree(sides, {"weight": weight}, what="class_centralization_loss", allow_empty_groups=False)
    g, = _resolve(sides, k)
    return _CentralLoss.apply(x, g, weight, process_group)


@collective_op()
def mean_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: C.GroupsArg, real_groups: C.GroupsArg,
                       num_groups: Optional[int] = None, weight: float = 1.0, process_group) -> Tensor:
    """:func:`edfkern.mean_matching_loss` (DM) with both sides' rows spread over the ranks.

    ``weight * sum_k ||mean_real_k - mean_syn_k||^2`` with the global class means; the same on every rank.
    """
    s, r = C.as_rows("syn", syn, empty_rows=True), C.as_rows("real", real, empty_rows=True)
    weight, gs, gr = _pair("mean_matching_loss", s, r, syn_groups, real_groups, num_groups, weight, ("seg_mean",))
    return _MeanMatching.apply(s, r, gs, gr, weight, process_group)
