"""Reference CPD kernels (SPEC section 4): kthvalue select, stable-sort tie-break, masked sums.

Selection: thr = k-th smallest l; among the values equal to thr, a stable ascending
sort drops the lowest indices first, so with c = #{l < thr} the first k - c equal
indices are dropped and ``tie`` is one past the last of them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import acc_dtype


def _select(l: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if k == 0:
        return l.new_full((), float("-inf")), torch.zeros((), dtype=torch.int64, device=l.device)
    thr = torch.kthvalue(l, k).values
    n_less = (l < thr).sum()
    eq_idx = (l == thr).nonzero()[:, 0]
    tie = eq_idx[k - n_less - 1] + 1
    return thr, tie


def _dropped(l: Tensor, thr: Tensor, tie: Tensor) -> Tensor:
    idx = torch.arange(l.numel(), device=l.device)
    return (l < thr) | ((l == thr) & (idx < tie))


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
    g = torch.where(keep, 2 * (s - t), torch.zeros_like(s)) * (grad_out.to(acc) / sum_d)
    return g.to(student.dtype)


def cpd_keep_mask(l: Tensor, k: int) -> Tensor:
    thr, tie = _select(l, k)
    return ~_dropped(l, thr, tie)
