"""Segmented reductions over flat features (docs/ops.md: CC and DM) in Triton.

Groups arrive in CSR form (``perm``, ``offsets``); a program owns one class and one
tile of the feature dimension and walks that class's rows, so no label tensor and no
(N, D) temporary is ever made.

Kernels, top-down:
    _seg_mean_kernel  mean_k = 1/n_k sum_{i in k} x_i (also used by covariance.py);
    _cc_fwd_kernel    the mean, then sum_i ||x_i - mean_k||^2 over the same tile (the
                      second walk over the class's rows hits L2), one partial per program;
    _cc_bwd_kernel    grad_i = coef * grad_out * (x_i - mean_k); the rows of a class are
                      split over SPLIT programs so small K still fills the device.
Bytes: seg_mean reads x once (N*D); cc_forward reads it twice (the second read mostly
from L2); cc_backward reads x and writes the gradient (2*N*D).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import acc_tl, acc_torch, as_acc, cast_to, next_pow2


@triton.jit
def _row(perm_ptr, j, HAS_PERM: tl.constexpr):
    """Input row of sorted row j (int64)."""
    if HAS_PERM:
        r = tl.load(perm_ptr + j).to(tl.int64)
    else:
        r = (j + tl.zeros([], tl.int64)).to(tl.int64)
    return r


@triton.jit
def _class_sum(x_ptr, perm_ptr, lo, hi, d, dmask, D, HAS_PERM: tl.constexpr, BLOCK: tl.constexpr,
               ACC: tl.constexpr):
    acc = tl.zeros([BLOCK], ACC)
    for j in range(lo, hi):
        r = _row(perm_ptr, j, HAS_PERM)
        acc += tl.load(x_ptr + r * D + d, mask=dmask, other=0.0).to(ACC)
    return acc


@triton.jit
def _seg_mean_kernel(
    x_ptr,     # (N, D) rows, any float dtype
    perm_ptr,  # (N,) int64 sorted row -> input row (unused unless HAS_PERM)
    off_ptr,   # (K+1,) int64 class offsets into the sorted rows
    mean_ptr,  # (K, D) ACC out: class means (zeros for empty classes)
    D,
    HAS_PERM: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dmask = d < D
    lo = tl.load(off_ptr + k)
    hi = tl.load(off_ptr + k + 1)
    acc = _class_sum(x_ptr, perm_ptr, lo, hi, d, dmask, D, HAS_PERM, BLOCK, ACC)
    mean = acc / tl.maximum(hi - lo, 1).to(ACC)
    tl.store(mean_ptr + k * D + d, mean, mask=dmask)


@triton.jit
def _cc_fwd_kernel(
    x_ptr,     # (N, D) rows
    perm_ptr,  # (N,) int64 sorted row -> input row (unused unless HAS_PERM)
    off_ptr,   # (K+1,) int64 class offsets
    mean_ptr,  # (K, D) ACC out: class means
    part_ptr,  # (K, num_tiles) ACC out: sum over the tile of ||x_i - mean_k||^2
    D,
    HAS_PERM: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    d = tile * BLOCK + tl.arange(0, BLOCK)
    dmask = d < D
    lo = tl.load(off_ptr + k)
    hi = tl.load(off_ptr + k + 1)
    mean = _class_sum(x_ptr, perm_ptr, lo, hi, d, dmask, D, HAS_PERM, BLOCK, ACC) / tl.maximum(hi - lo, 1).to(ACC)
    tl.store(mean_ptr + k * D + d, mean, mask=dmask)
    sq = tl.zeros([BLOCK], ACC)
    for j in range(lo, hi):
        r = _row(perm_ptr, j, HAS_PERM)
        xc = tl.load(x_ptr + r * D + d, mask=dmask, other=0.0).to(ACC) - mean
        sq += tl.where(dmask, xc * xc, 0.0)
    tl.store(part_ptr + k * tl.num_programs(1) + tile, tl.sum(sq, axis=0))


@triton.jit
def _cc_bwd_kernel(
    gout_ptr,  # () upstream gradient
    x_ptr,     # (N, D) rows
    perm_ptr,  # (N,) int64 sorted row -> input row (unused unless HAS_PERM)
    off_ptr,   # (K+1,) int64 class offsets
    mean_ptr,  # (K, D) ACC class means
    out_ptr,   # (N, D) out: gradient, x's dtype
    D, coef: tl.float64,
    HAS_PERM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dmask = d < D
    lo = tl.load(off_ptr + k)
    hi = tl.load(off_ptr + k + 1)
    scale = as_acc(coef, ACC) * tl.load(gout_ptr).to(ACC)
    mean = tl.load(mean_ptr + k * D + d, mask=dmask, other=0.0)
    for j in range(lo + tl.program_id(2), hi, SPLIT):
        r = _row(perm_ptr, j, HAS_PERM)
        xc = tl.load(x_ptr + r * D + d, mask=dmask, other=0.0).to(ACC) - mean
        tl.store(out_ptr + r * D + d, cast_to(xc * scale, out_ptr.dtype.element_ty), mask=dmask)


# ----------------------------------------------------------------------------- launchers


def _block(D: int) -> int:
    """Feature tile: 128 wide, so D=512 gives 4 programs per class (rows stay 512-byte coalesced)."""
    return min(128, next_pow2(D, 16))


def _split(n: int, k: int, tiles: int) -> int:
    """Programs per class for row-parallel kernels: enough to fill ~1000 programs, at most one per row."""
    avg = max(1, n // max(k, 1))
    return max(1, min(avg, triton.cdiv(1024, max(1, k * tiles))))


def seg_mean(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> Tensor:
    n, D = x.shape
    K = offsets.numel() - 1
    mean = torch.empty((K, D), dtype=acc_torch(x.dtype), device=x.device)
    if K == 0 or D == 0:
        return mean
    block = _block(D)
    _seg_mean_kernel[(K, triton.cdiv(D, block))](
        x, perm if perm is not None else offsets, offsets, mean, D,
        HAS_PERM=perm is not None, BLOCK=block, ACC=acc_tl(x.dtype), num_warps=4)
    return mean


def cc_forward(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    n, D = x.shape
    K = offsets.numel() - 1
    acc = acc_torch(x.dtype)
    mean = torch.empty((K, D), dtype=acc, device=x.device)
    if K == 0 or D == 0:
        return torch.zeros((), dtype=acc, device=x.device), mean.zero_()
    block = _block(D)
    tiles = triton.cdiv(D, block)
    part = torch.empty((K, tiles), dtype=acc, device=x.device)
    _cc_fwd_kernel[(K, tiles)](
        x, perm if perm is not None else offsets, offsets, mean, part, D,
        HAS_PERM=perm is not None, BLOCK=block, ACC=acc_tl(x.dtype), num_warps=4)
    return part.sum(), mean


def cc_backward(grad_out: Tensor, x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor,
                coef: float) -> Tensor:
    n, D = x.shape
    K = offsets.numel() - 1
    out = torch.empty_like(x)
    if n == 0 or D == 0:
        return out
    block = _block(D)
    tiles = triton.cdiv(D, block)
    split = _split(n, K, tiles)
    _cc_bwd_kernel[(K, tiles, split)](
        grad_out, x, perm if perm is not None else offsets, offsets, mean.contiguous(), out, D, float(coef),
        HAS_PERM=perm is not None, SPLIT=split, BLOCK=block, ACC=acc_tl(mean.dtype), num_warps=4)
    return out
