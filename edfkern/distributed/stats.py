"""Exact per-class statistics of rows spread over ranks.

Every rank reduces its own rows with a backend kernel (``seg_mean``, ``cov_forward``, ``cc_forward``;
any backend), and the ranks merge the per-class results in two all-reduces:

1. the per-class sums ``n_r * mean_r`` and counts ``n_r``  ->  the global mean ``mu`` and ``n``;
2. each rank's scatter of its rows about the *global* mean: the rows are centred on ``mu`` first,
   ``Xc_i = X_i - mu_k``, and the kernel's result on them (``Sigma_c``, the local mean ``m_c`` of the
   centred rows) gives ``S_r = n_r (Sigma_c + m_c m_c^T)``  ->  ``Sigma = sum_r S_r / n``.

Centring on the global mean before the kernel matters: an error ``e`` in the rounded ``mu`` then
enters only as ``n e e^T`` (second order), exactly as in one process, whereas Chan's update from
the rounded local means, ``n_r (mean_r - mu)(mean_r - mu)^T``, carries the rounding of
``mean_r`` to first order (measured: 3e-4 absolute error on a unit-variance class with mean 1e4
in float32, against 1.5e-6 for one process). The naive merge of raw moments
``E[x x^T] - E[x] E[x]^T`` is never used: in float32 it loses every digit when the mean is large
against the spread.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .._dispatch import kernel
from ..reference._common import ieee_matmul
from . import _comm
from ._agree import collective_op, exchange, same


def local_class_sums(name: str, x: Tensor, g: C.Groups) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's ``(mean_r (K, ...), n_r * mean_r, n_r (K,))`` in acc, from the ``seg_mean`` kernel
    (which takes flat ``(N, D)`` rows; other row shapes are flattened and restored)."""
    k, acc = g.num_groups, C.acc_dtype(x.dtype)
    n = g.offsets.diff().to(acc)
    if x.shape[0] == 0:
        mean = x.new_zeros((k,) + tuple(x.shape[1:]), dtype=acc)
    else:
        flat = x.reshape(x.shape[0], -1).contiguous()
        mean = kernel("seg_mean", x.device)(flat, g.perm, g.offsets).view((k,) + tuple(x.shape[1:]))
    return mean, mean * n.view((k,) + (1,) * (mean.dim() - 1)), n


def global_mean(sums: Tensor, n: Tensor) -> Tensor:
    """``sums / n`` per class, zeros where ``n == 0``."""
    shape = (n.numel(),) + (1,) * (sums.dim() - 1)
    return torch.where(n.view(shape) > 0, sums / n.clamp_min(1).view(shape), torch.zeros_like(sums))


def require_nonempty(n: Tensor, side: str) -> None:
    """``ValueError`` naming the first class with no row on any rank (``n`` is already reduced)."""
    empty = (n == 0).nonzero()
    if empty.numel():
        raise ValueError(f"group {int(empty[0, 0])} is empty on the {side} side on every rank; every group of a "
                         "loss needs at least one row somewhere")


def centred(x: Tensor, g: C.Groups, mu: Tensor) -> Tensor:
    """``x_i - mu_k`` for every row ``i`` of class ``k``, in acc (the input of the second pass)."""
    return x.to(mu.dtype) - mu[C.row_labels(g.perm, g.offsets, x.shape[0])]


def scatter_of_centred(sigma_c: Tensor, mean_c: Tensor, n_r: Tensor) -> Tensor:
    """``sum_i Xc_i Xc_i^T = n_r (Sigma_c + m_c m_c^T)`` per class, (K, C, C), from the ``cov_forward``
    kernel's ``(Sigma_c, m_c)`` on rows already centred on the global mean."""
    with ieee_matmul():
        between = torch.bmm(mean_c, mean_c.transpose(1, 2))
    return (sigma_c + between) * n_r[:, None, None]


_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)  # same order everywhere
_MAX_DIMS = 16


@collective_op(group_arg="group", none_means_default=True)
def reduce_class_stats(sums: Tensor, counts: Tensor, *, group: Optional[object] = None
                       ) -> tuple[Tensor, Tensor]:
    """Sum per-class statistics over ranks: ``sums (K, ...)`` and ``counts (K,)`` -> the global ones.

    For statistics of CAM maps computed on each rank's share of the images (for example the
    per-class complexity counts of Comp-DD). Returns new tensors; the inputs are not modified.
    ``group=None`` uses the default group under ``torchrun``, else returns copies. Shapes and
    dtypes are compared across ranks first (``ValueError`` on every rank when they differ).
    """
    group = group if group is not None else _comm.default_group()
    if not isinstance(sums, Tensor) or not isinstance(counts, Tensor):
        raise TypeError(f"sums and counts must be tensors, got {type(sums).__name__} and {type(counts).__name__}")
    if counts.dim() != 1 or sums.dim() < 1 or sums.shape[0] != counts.shape[0] or sums.dim() > _MAX_DIMS:
        raise ValueError(f"sums must have shape (K, ...) with at most {_MAX_DIMS} dims and counts (K,), got "
                         f"{tuple(sums.shape)} and {tuple(counts.shape)}")
    sums, counts = sums.clone(), counts.clone()
    table = exchange([_DTYPES.index(sums.dtype), _DTYPES.index(counts.dtype), sums.dim(), *sums.shape])
    same(table, 0, "reduce_class_stats: the dtype of sums", lambda i: str(_DTYPES[i]))
    same(table, 1, "reduce_class_stats: the dtype of counts", lambda i: str(_DTYPES[i]))
    shapes = [tuple(r[3:3 + r[2]]) for r in table]
    if any(sh != shapes[0] for sh in shapes):
        raise ValueError("reduce_class_stats: the shape of sums must be the same on every rank, got " +
                         ", ".join(f"rank {r}: {sh}" for r, sh in enumerate(shapes)))
    _comm.all_reduce_sum_([sums, counts], group=group, what="reduce_class_stats")
    return sums, counts
