"""The backward formulas of the feature losses, one plain function each.

The single-process ops (:mod:`edfkern.ops`) and their multi-rank paths (:mod:`edfkern.distributed`)
both call these. They differ only in where the statistics come from: one process's groups, or the
all-reduced statistics of every rank's rows. The per-row work (``M_k (x_i - mean_k)`` and
``coef * grad * (f_i - mu_k)``) is a backend kernel, ``cov_backward`` or ``cc_backward``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def inv_counts(n: Tensor) -> Tensor:
    """``1 / n_k`` per group, ``0`` for an empty group (whose rows do not exist)."""
    return torch.where(n > 0, 1.0 / n.clamp_min(1), torch.zeros_like(n))


def local_covariance_coef(g_sigma: Tensor, n: Tensor) -> Tensor:
    """``M_k = (G_k + G_k^T) / n_k`` from ``dL/dSigma`` ``(K, C, C)``: the row gradient is ``M_k (x_i - mean_k)``."""
    return (g_sigma + g_sigma.transpose(1, 2)) * inv_counts(n.to(g_sigma.dtype))[:, None, None]


def covariance_matching_coefs(g: Tensor, weight: float, s_syn: Tensor, s_real: Tensor, n_syn: Tensor,
                              n_real: Tensor) -> tuple[Tensor, Tensor]:
    """``(M_syn, M_real)`` of ``L = w sum_k ||S_real - S_syn||^2``: ``dL/dX_i = 4w/n_k (S_syn - S_real)(X_i - mean_k)``
    on the syn side and its negative over the real side's ``n_k`` on the other."""
    d = (s_syn - s_real) * (4.0 * weight * g)
    return d * inv_counts(n_syn.to(d.dtype))[:, None, None], -d * inv_counts(n_real.to(d.dtype))[:, None, None]


def mean_matching_rows(g: Tensor, coef: float, diff: Tensor, n: Tensor, labels: Tensor,
                       dtype: Optional[torch.dtype] = None) -> Tensor:
    """Row ``i`` of class ``k`` gets ``coef * g * diff_k / n_k`` (``coef = +-2w``; ``diff = mean_syn - mean_real``).

    ``labels`` is the class of every row, ``(N,)``; the result is ``(N, D)`` in ``dtype`` (default ``diff``'s).
    """
    per_class = diff * (coef * g) / n.clamp_min(1).to(diff.dtype)[:, None]
    return per_class.index_select(0, labels).to(dtype or diff.dtype)
