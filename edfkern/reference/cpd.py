"""Reference CPD kernels: kthvalue select, stable-sort tie-break, masked sums.

Selection: thr = k-th smallest l; among the values equal to thr, a stable ascending
sort drops the lowest indices first, so with c = #{l < thr} the first k - c equal
indices are dropped and ``tie`` is one past the last of them.

"Smaller" and "equal" are those of ``torch.sort``: every NaN (either sign, any payload)
is larger than +inf and all NaNs are equal to each other (docs/special-values.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import acc_dtype


def _less_equal(l: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
    """``l < thr`` and ``l == thr`` in torch.sort's order (NaN above +inf, all NaNs equal)."""
    l_nan, t_nan = l.isnan(), thr.isnan()
    return (l < thr) | (t_nan & ~l_nan), (l == thr) | (t_nan & l_nan)


def _select(l: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if k == 0:
        return l.new_full((), float("-inf")), torch.zeros((), dtype=torch.int64, device=l.device)
    thr = torch.kthvalue(l, k).values  # NaNs count as the largest values, like torch.sort
    less, equal = _less_equal(l, thr)
    eq_idx = equal.nonzero()[:, 0]
    tie = eq_idx[k - less.sum() - 1] + 1
    return thr, tie


def _dropped(l: Tensor, thr: Tensor, tie: Tensor) -> Tensor:
    idx = torch.arange(l.numel(), device=l.device)
    less, equal = _less_equal(l, thr)
    return less | (equal & (idx < tie))


def _losses(student: Tensor, target: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(student.dtype)
    s, t, s0 = student.to(acc), target.to(acc), start.to(acc)
    return (s - t) * (s - t), (s0 - t) * (s0 - t)


def cpd_forward(student: Tensor, target: Tensor, start: Tensor, k: int):
    l, d = _losses(student, target, start)
    thr, tie = _select(l, k)
    keep = ~_dropped(l, thr, tie)
    zero = l.new_zeros(())
    return torch.where(keep, l, zero).sum(), torch.where(keep, d, zero).sum(), thr, tie


def cpd_backward(grad_out: Tensor, student: Tensor, target: Tensor, start: Tensor, thr: Tensor, tie: Tensor,
                 sum_d: Tensor) -> Tensor:
    acc = acc_dtype(student.dtype)
    s, t = student.to(acc), target.to(acc)
    l = (s - t) * (s - t)
    keep = ~_dropped(l, thr, tie)
    v2 = 2 * (s - t)
    # a dropped entry gets 0 * 2(s-t), as autograd through the loop's gather gives it: 0, or NaN where
    # s - t is not finite; never 0 * (grad_out / sum_d), which is NaN whenever sum_d is 0
    g = torch.where(keep, v2 * (grad_out.to(acc) / sum_d), v2 * 0)
    return g.to(student.dtype)


def cpd_keep_mask(l: Tensor, k: int) -> Tensor:
    thr, tie = _select(l, k)
    return ~_dropped(l, thr, tie)
