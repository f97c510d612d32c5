"""Local covariance (docs/ops.md, IID) in Triton, all classes in one launch.

Class k's centred rows, laid side by side, form Y_k = [x_i - mean_k]_{i in k}, a
(C, n_k*L) matrix whose column t is (row r = t // L of the class, position l = t % L).
Then Sigma_k = Y_k Y_k^T / n_k and the backward is G_k = M_k Y_k, both plain tiled
matmuls over that flattened column index; the centred copy is never stored.

Kernels, top-down:
    _cov_fwd_kernel  grid (K, (C/BM)*(C/BN), SPLIT): Sigma tile = sum over column tiles of
                     A (BM x BT) @ B^T (BT x BN), A and B gathered and centred on the fly;
                     with SPLIT > 1 (few classes) each program takes every SPLIT-th column
                     tile and the launcher adds the SPLIT partial matrices;
    _cov_bwd_kernel  grid (K, C/BM, SPLIT): G tile = sum over C chunks of
                     M (BM x BK) @ Y (BK x BT), the class's column tiles split over SPLIT programs.
The class means come from features._seg_mean_kernel (x viewed as (N, C*L)).
fp32 accumulation; tl.dot with input_precision="ieee" unless edfkern.config.allow_tf32;
fp64 inputs take a broadcast-multiply-reduce path instead of tl.dot (USE_DOT=False).
Bytes: read x twice in forward (mean pass + product pass; the product pass re-reads each
row C/BM times, mostly from L2), write K*C*C; backward reads x and writes the gradient.
FLOPs: 2*N*C*C*L each way.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import acc_tl, acc_torch, cast_to, device_sm_count, dot_precision, next_pow2
from .features import _split, seg_mean


@triton.jit
def _rows(perm_ptr, lo, r, tv, HAS_PERM: tl.constexpr):
    """Input rows (int64) of the class's sorted rows lo + r, for the valid lanes tv."""
    if HAS_PERM:
        row = tl.load(perm_ptr + lo + r, mask=tv, other=0).to(tl.int64)
    else:
        row = (lo + r).to(tl.int64)
    return row


@triton.jit
def _centred_tile(x_ptr, perm_ptr, mean_ptr, k, lo, n_k, c, t, C, L,
                  HAS_PERM: tl.constexpr, ACC: tl.constexpr):
    """(len(c), len(t)) tile of Y_k: rows c (channels), columns t (row-in-class * L + l)."""
    r = t // L
    l = t % L
    tv = t < n_k * L
    row = _rows(perm_ptr, lo, r, tv, HAS_PERM)
    m = (c[:, None] < C) & tv[None, :]
    x = tl.load(x_ptr + row[None, :] * C * L + c[:, None] * L + l[None, :], mask=m, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + k * C * L + c[:, None] * L + l[None, :], mask=m, other=0.0)
    return x - mu  # zero outside the class / channel range


@triton.jit(do_not_specialize=["SPLIT"])
def _cov_fwd_kernel(
    x_ptr,      # (N, C, L) features, any float dtype
    perm_ptr,   # (N,) int64 sorted row -> input row (unused unless HAS_PERM)
    off_ptr,    # (K+1,) int64 class offsets
    mean_ptr,   # (K, C, L) ACC class means
    sigma_ptr,  # (SPLIT, K, C, C) ACC out: Sigma, or SPLIT partial sums of it (added up by the launcher)
    C, L, K, SPLIT,
    HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(C, BN)
    cm = (tl.program_id(1) // tiles_n) * BM + tl.arange(0, BM)
    cn = (tl.program_id(1) % tiles_n) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    lo = tl.load(off_ptr + k)
    n_k = tl.load(off_ptr + k + 1) - lo
    acc = tl.zeros([BM, BN], ACC)
    for t0 in range(split * BT, n_k * L, SPLIT * BT):  # split-K: this program's share of the columns
        t = t0 + tl.arange(0, BT)
        a = _centred_tile(x_ptr, perm_ptr, mean_ptr, k, lo, n_k, cm, t, C, L, HAS_PERM, ACC)
        b = _centred_tile(x_ptr, perm_ptr, mean_ptr, k, lo, n_k, cn, t, C, L, HAS_PERM, ACC)
        if USE_DOT:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        else:
            acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    sigma = acc / tl.maximum(n_k, 1).to(ACC)
    m = (cm[:, None] < C) & (cn[None, :] < C)
    tl.store(sigma_ptr + (split * K + k) * C * C + cm[:, None] * C + cn[None, :], sigma, mask=m)


@triton.jit(do_not_specialize=["SPLIT"])
def _cov_bwd_kernel(
    x_ptr,     # (N, C, L) features
    perm_ptr,  # (N,) int64 sorted row -> input row (unused unless HAS_PERM)
    off_ptr,   # (K+1,) int64 class offsets
    mean_ptr,  # (K, C, L) ACC class means
    M_ptr,     # (K, C, C) ACC per-class matrices
    out_ptr,   # (N, C, L) out: gradient, x's dtype
    C, L, SPLIT,
    HAS_PERM: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    cm = tl.program_id(1) * BM + tl.arange(0, BM)
    lo = tl.load(off_ptr + k)
    n_k = tl.load(off_ptr + k + 1) - lo
    for t0 in range(tl.program_id(2) * BT, n_k * L, SPLIT * BT):
        t = t0 + tl.arange(0, BT)
        acc = tl.zeros([BM, BT], ACC)
        for c0 in range(0, C, BK):
            ck = c0 + tl.arange(0, BK)
            mm = (cm[:, None] < C) & (ck[None, :] < C)
            Mt = tl.load(M_ptr + k * C * C + cm[:, None] * C + ck[None, :], mask=mm, other=0.0).to(ACC)
            y = _centred_tile(x_ptr, perm_ptr, mean_ptr, k, lo, n_k, ck, t, C, L, HAS_PERM, ACC)
            if USE_DOT:
                acc = tl.dot(Mt, y, acc, input_precision=PRECISION)
            else:
                acc += tl.sum(Mt[:, :, None] * y[None, :, :], axis=1)
        r = t // L
        l = t % L
        tv = t < n_k * L
        row = _rows(perm_ptr, lo, r, tv, HAS_PERM)
        om = (cm[:, None] < C) & tv[None, :]
        tl.store(out_ptr + row[None, :] * C * L + cm[:, None] * L + l[None, :],
                 cast_to(acc, out_ptr.dtype.element_ty), mask=om)


# ----------------------------------------------------------------------------- launchers


def _tiles(C: int, fp64: bool) -> tuple[int, int]:
    """(channel tile, column tile). tl.dot needs every dimension >= 16."""
    if fp64:  # the broadcast path holds BM*BN*BT products in registers: keep it small
        return min(32, next_pow2(C, 16)), 16
    return min(64, next_pow2(C, 16)), 32


def _num_warps(fp64: bool) -> int:
    """4 warps for the tl.dot path. The fp64 broadcast path holds BM*BN*BT = 16384 fp64 products
    per program: over 4 warps that is 128 doubles (256 registers) a thread, past the 255 cap, and
    ptxas spilled ~900 B a thread on sm_90; over 8 warps it is half that (forward 246, backward 194
    registers, no spill). The interpreter ignores num_warps, so CPU results are unchanged."""
    return 8 if fp64 else 4


#: Software-pipelining depth of the backward's inner loop over C chunks. That loop runs only
#: C/BK = 2 times at C=128, so pipelining has nothing to overlap, and with num_stages=3 the staged
#: tiles pushed _cov_bwd_kernel to the 255-register cap with ~1.2 KB of spill traffic a thread on
#: sm_90 (fp32/fp16/bf16, BM=BK=64, BT=32); with 1 stage it uses 96 registers and no spill.
#: Checked by ``python -m tools.gpucheck compile-sm90``.
_BWD_STAGES = 1


def _fwd_stages(x: Tensor, gathered: bool, precision: str) -> int:
    """Pipelining depth of the forward. 3, except for 16-bit inputs gathered through ``perm`` on the
    tensor-core path (tf32, tf32x3): there Triton 3.9's pipeliner turns the row gather into 2-byte
    cp.async copies, which sm_90 rejects ("cp.async does not support transfers smaller than 4
    bytes": a compile error on the GPU, invisible to the interpreter), so those load unpipelined."""
    return 1 if gathered and x.element_size() < 4 and precision != "ieee" else 3


def _min_programs() -> int:
    """Programs a launch should have to fill the device: 2 per SM on CUDA; 8 under the
    interpreter, which is enough to exercise the split-K path in the CPU tests."""
    sms = device_sm_count()
    return 8 if sms is None else 2 * sms


def _fwd_split(cols: int, K: int, tiles: int, bt: int) -> int:
    """Split the columns of each class over this many programs when K * tiles programs are too few
    (cifar10-ipc1000: K=10, 4 tiles -> 40 programs). Costs a (SPLIT, K, C, C) workspace and a sum."""
    per_class = triton.cdiv(max(cols // max(K, 1), 1), bt)  # column tiles per (average) class
    return max(1, min(32, per_class, triton.cdiv(_min_programs(), K * tiles)))


def _means(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> Tensor:
    """(K, C, L) class means: the flat-feature segmented mean over D = C * L."""
    n, C, L = x.shape
    return seg_mean(x.view(n, C * L), perm, offsets).view(-1, C, L)


def cov_forward(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    n, C, L = x.shape
    K = offsets.numel() - 1
    acc = acc_torch(x.dtype)
    if K == 0 or C == 0 or L == 0:
        return torch.zeros((K, C, C), dtype=acc, device=x.device), torch.zeros((K, C, L), dtype=acc, device=x.device)
    mean = _means(x, perm, offsets)
    fp64 = acc == torch.float64
    bm, bt = _tiles(C, fp64)
    tiles = triton.cdiv(C, bm)
    split = _fwd_split(n * L, K, tiles * tiles, bt)
    sigma = torch.empty((split, K, C, C), dtype=acc, device=x.device)
    precision = dot_precision()
    _cov_fwd_kernel[(K, tiles * tiles, split)](
        x, perm if perm is not None else offsets, offsets, mean, sigma, C, L, K, split,
        HAS_PERM=perm is not None, USE_DOT=not fp64, PRECISION=precision,
        BM=bm, BN=bm, BT=bt, ACC=acc_tl(x.dtype), num_warps=_num_warps(fp64),
        num_stages=_fwd_stages(x, perm is not None, precision))
    return (sigma[0] if split == 1 else sigma.sum(0)), mean


def cov_backward(x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor, M: Tensor) -> Tensor:
    n, C, L = x.shape
    K = offsets.numel() - 1
    out = torch.empty_like(x)
    if n == 0 or C == 0 or L == 0:
        return out
    fp64 = mean.dtype == torch.float64
    bm, bt = _tiles(C, fp64)
    bk = bm
    tiles = triton.cdiv(C, bm)
    split = _split(n * L // bt if n * L >= bt else 1, K, tiles)
    _cov_bwd_kernel[(K, tiles, split)](
        x, perm if perm is not None else offsets, offsets, mean.contiguous(), M.contiguous(), out, C, L, split,
        HAS_PERM=perm is not None, USE_DOT=not fp64, PRECISION=dot_precision(),
        BM=bm, BK=bk, BT=bt, ACC=acc_tl(mean.dtype), num_warps=_num_warps(fp64), num_stages=_BWD_STAGES)
    return out
