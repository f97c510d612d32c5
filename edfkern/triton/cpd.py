"""CPD (docs/ops.md) in Triton: radix select of the k-th smallest loss, no sort.

The order of floats is the order of their *keys*: the bit pattern with the sign bit
set for non-negative values and all bits flipped for negative ones (-0 maps to +0),
read as an unsigned integer; every NaN maps to the all-ones key, so NaNs sort last and
tie among themselves, as in torch.sort (docs/special-values.md). The k-th smallest key is found digit by digit, 8 bits
per pass, high to low:

    _cpd_hist_kernel      histogram of the current digit over the entries whose higher
                          digits equal the prefix found so far (tl.histogram + atomics);
    _cpd_select_kernel    one program: prefix-sum of the 256 bins, picks the bin holding
                          the k-th entry, extends the prefix and the remaining rank;
    _cpd_partials_kernel  per block: #(l == thr), and sums of l and d over l > thr and
                          over l == thr;
    _cpd_finalize_kernel  one program: prefix over the per-block counts finds the block
                          where the stable-sort tie lands, resolves it inside that block
                          (cumsum), and adds up the kept sums;
    _cpd_backward_kernel  grad = grad_out * 2 (s - t) * keep / sum_d, keep rebuilt from (thr, tie);
    _cpd_mask_kernel      the bool keep-set for cpd_keep_mask.

Ties match a stable ascending sort exactly: among the entries equal to thr, the first
``k - #(l < thr)`` (by index) are dropped, and ``tie`` is one past the last of them.
Workspace: KEYBITS/8 * 256 int64 bins, 2 int64 of state, and 5 numbers per 2048-entry
block (0.25% of the inputs' bytes for fp32); nothing else of size P.
Bytes (fp32, forward): 4 histogram passes and the partials pass read s and t (5 x 8P),
the partials pass also reads s0 (4P): 44P bytes, about 27 MB at P = 615,690.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import acc_tl, acc_torch, cast_to

DIGIT_BITS = 8
NBINS = 1 << DIGIT_BITS
BLOCK = 2048
FBLOCK = 1024


@triton.jit
def _key(l, KEYBITS: tl.constexpr):
    """Order-preserving unsigned key (as uint64) of the float ``l`` of width KEYBITS."""
    if KEYBITS == 64:
        u = l.to(tl.uint64, bitcast=True)
    elif KEYBITS == 32:
        u = l.to(tl.uint32, bitcast=True).to(tl.uint64)
    else:
        u = l.to(tl.uint16, bitcast=True).to(tl.uint64)
    sign = tl.full([], 1, tl.uint64) << (KEYBITS - 1)
    full = sign | (sign - 1)
    # NaN from the bits (magnitude above the infinity's), not l != l: the CPU interpreter compares
    # bfloat16 values as their raw integers
    if KEYBITS == 64:
        inf_bits = tl.full([], 0x7FF0000000000000, tl.uint64)
    elif KEYBITS == 32:
        inf_bits = tl.full([], 0x7F800000, tl.uint64)
    elif l.dtype == tl.bfloat16:
        inf_bits = tl.full([], 0x7F80, tl.uint64)
    else:
        inf_bits = tl.full([], 0x7C00, tl.uint64)
    is_nan = (u & (sign - 1)) > inf_bits
    u = tl.where(u == sign, 0, u)  # -0 compares equal to +0
    key = tl.where((u & sign) != 0, ~u & full, u | sign)
    return tl.where(is_nan, full, key)  # every NaN (either sign, any payload): one key above +inf


@triton.jit
def _unkey(key, KEYBITS: tl.constexpr, OUT: tl.constexpr):
    """Inverse of _key, as a float of type OUT (width KEYBITS)."""
    sign = tl.full([], 1, tl.uint64) << (KEYBITS - 1)
    full = sign | (sign - 1)
    u = tl.where((key & sign) != 0, key ^ sign, ~key & full)
    if KEYBITS == 64:
        v = u.to(tl.float64, bitcast=True)
    elif KEYBITS == 32:
        v = u.to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        v = u.to(tl.uint16).to(OUT, bitcast=True)
    return v


@triton.jit
def _losses(s_ptr, t_ptr, s0_ptr, offs, valid, FROM_L: tl.constexpr, HAS_D: tl.constexpr, ACC: tl.constexpr):
    """l (and d) for a block: l loaded as is (FROM_L), else l = (s-t)^2, d = (s0-t)^2 in ACC."""
    if FROM_L:
        l = tl.load(s_ptr + offs, mask=valid, other=0.0)
        d = l
    else:
        s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(ACC)
        t = tl.load(t_ptr + offs, mask=valid, other=0.0).to(ACC)
        l = (s - t) * (s - t)
        if HAS_D:
            s0 = tl.load(s0_ptr + offs, mask=valid, other=0.0).to(ACC)
            d = (s0 - t) * (s0 - t)
        else:
            d = l
    return l, d


@triton.jit
def _cpd_hist_kernel(
    s_ptr,      # (P,) student, or l itself when FROM_L
    t_ptr,      # (P,) target (unused when FROM_L)
    state_ptr,  # int64 [prefix key bits, remaining rank]
    hist_ptr,   # (NBINS,) int64 histogram of this pass, accumulated with atomics
    P,
    FROM_L: tl.constexpr, KEYBITS: tl.constexpr, SHIFT: tl.constexpr, DB: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < P
    l, _ = _losses(s_ptr, t_ptr, t_ptr, offs, valid, FROM_L, False, ACC)
    key = _key(l, KEYBITS)
    sel = valid
    if SHIFT + DB < KEYBITS:  # entries whose higher digits equal the prefix found so far
        prefix = tl.load(state_ptr).to(tl.uint64, bitcast=True)
        sel = sel & ((key >> (SHIFT + DB)) == (prefix >> (SHIFT + DB)))
    digit = ((key >> SHIFT) & ((1 << DB) - 1)).to(tl.int32)
    hist = tl.histogram(digit, 1 << DB, mask=sel)
    tl.atomic_add(hist_ptr + tl.arange(0, 1 << DB), hist.to(tl.int64))


@triton.jit
def _cpd_select_kernel(
    hist_ptr,   # (NBINS,) int64 histogram of this pass
    state_ptr,  # int64 [prefix, remaining rank], updated
    SHIFT: tl.constexpr, DB: tl.constexpr,
):
    bins = tl.arange(0, 1 << DB)
    hist = tl.load(hist_ptr + bins)
    cum = tl.cumsum(hist, axis=0)
    krem = tl.load(state_ptr + 1)
    b = tl.sum((cum < krem).to(tl.int64), axis=0)  # first bin whose inclusive count reaches krem
    before = tl.sum(tl.where(bins < b, hist, 0), axis=0)
    prefix = tl.load(state_ptr).to(tl.uint64, bitcast=True) | (b.to(tl.uint64) << SHIFT)
    tl.store(state_ptr, prefix.to(tl.int64, bitcast=True))
    tl.store(state_ptr + 1, krem - before)


@triton.jit
def _cpd_partials_kernel(
    s_ptr,      # (P,) student, or l when FROM_L
    t_ptr,      # (P,) target
    s0_ptr,     # (P,) start
    state_ptr,  # int64 [thr key bits, #equal entries to drop]
    cnt_ptr,    # (nblocks,) int64 out: #(l == thr) per block
    part_ptr,   # (nblocks, 4) ACC out: sum l, sum d over l > thr; sum l, sum d over l == thr
    P,
    FROM_L: tl.constexpr, HAS_SUMS: tl.constexpr, ALL_KEPT: tl.constexpr, KEYBITS: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < P
    l, d = _losses(s_ptr, t_ptr, s0_ptr, offs, valid, FROM_L, HAS_SUMS, ACC)
    if ALL_KEPT:
        gt = valid
        eq = valid & (offs < 0)
    else:
        key = _key(l, KEYBITS)
        thr = tl.load(state_ptr).to(tl.uint64, bitcast=True)
        gt = valid & (key > thr)
        eq = valid & (key == thr)
    tl.store(cnt_ptr + pid, tl.sum(eq.to(tl.int64), axis=0))
    if HAS_SUMS:
        tl.store(part_ptr + pid * 4 + 0, tl.sum(tl.where(gt, l, 0.0), axis=0))
        tl.store(part_ptr + pid * 4 + 1, tl.sum(tl.where(gt, d, 0.0), axis=0))
        tl.store(part_ptr + pid * 4 + 2, tl.sum(tl.where(eq, l, 0.0), axis=0))
        tl.store(part_ptr + pid * 4 + 3, tl.sum(tl.where(eq, d, 0.0), axis=0))


@triton.jit
def _cpd_finalize_kernel(
    s_ptr, t_ptr, s0_ptr,  # the inputs, as for _cpd_partials_kernel (the tie block is re-read)
    state_ptr,  # int64 [thr key bits, #equal entries to drop]
    cnt_ptr,    # (nblocks,) int64 per-block #(l == thr)
    part_ptr,   # (nblocks, 4) ACC per-block partial sums
    suml_ptr,   # () ACC out: kept sum of l (when HAS_SUMS)
    sumd_ptr,   # () ACC out: kept sum of d (when HAS_SUMS)
    thr_ptr,    # () ACC out: the threshold value (when HAS_SUMS)
    tie_ptr,    # () int64 out: one past the last dropped entry equal to thr
    P, nblocks,
    FROM_L: tl.constexpr, HAS_SUMS: tl.constexpr, ALL_KEPT: tl.constexpr, KEYBITS: tl.constexpr,
    BLOCK: tl.constexpr, FBLOCK: tl.constexpr, ACC: tl.constexpr,
):
    krem = tl.load(state_ptr + 1)
    carry = tl.zeros([], tl.int64)
    tie_block = tl.zeros([], tl.int64)
    rank_in_block = tl.zeros([], tl.int64)
    sl = tl.zeros([FBLOCK], ACC)
    sd = tl.zeros([FBLOCK], ACC)
    for j0 in range(0, nblocks, FBLOCK):
        j = j0 + tl.arange(0, FBLOCK)
        jv = j < nblocks
        cnt = tl.load(cnt_ptr + j, mask=jv, other=0)
        incl = tl.cumsum(cnt, axis=0) + carry
        excl = incl - cnt
        if not ALL_KEPT:
            hit = jv & (excl < krem) & (incl >= krem)
            tie_block += tl.sum(tl.where(hit, j, 0).to(tl.int64), axis=0)
            rank_in_block += tl.sum(tl.where(hit, krem - excl, 0), axis=0)
        carry += tl.sum(cnt, axis=0)
        if HAS_SUMS:
            sl += tl.load(part_ptr + j * 4 + 0, mask=jv, other=0.0)
            sd += tl.load(part_ptr + j * 4 + 1, mask=jv, other=0.0)
            later = jv & (excl >= krem)  # every equal entry of these blocks is kept
            if not ALL_KEPT:
                sl += tl.where(later, tl.load(part_ptr + j * 4 + 2, mask=jv, other=0.0), 0.0)
                sd += tl.where(later, tl.load(part_ptr + j * 4 + 3, mask=jv, other=0.0), 0.0)
    sum_l = tl.sum(sl, axis=0)
    sum_d = tl.sum(sd, axis=0)
    if ALL_KEPT:
        tl.store(tie_ptr, tl.zeros([], tl.int64))
        if HAS_SUMS:
            tl.store(thr_ptr, tl.full([], float("-inf"), ACC))
    else:
        # the block where the stable-sort tie lands: drop its first rank_in_block equal entries
        i = tl.arange(0, BLOCK)
        offs = tie_block * BLOCK + i
        valid = offs < P
        l, d = _losses(s_ptr, t_ptr, s0_ptr, offs, valid, FROM_L, HAS_SUMS, ACC)
        thr = tl.load(state_ptr).to(tl.uint64, bitcast=True)
        eq = valid & (_key(l, KEYBITS) == thr)
        rank = tl.cumsum(eq.to(tl.int64), axis=0)
        last = tl.sum(tl.where(eq & (rank == rank_in_block), i, 0).to(tl.int64), axis=0)
        tl.store(tie_ptr, tie_block * BLOCK + last + 1)
        if HAS_SUMS:
            kept = eq & (rank > rank_in_block)
            sum_l += tl.sum(tl.where(kept, l, 0.0), axis=0)
            sum_d += tl.sum(tl.where(kept, d, 0.0), axis=0)
            tl.store(thr_ptr, _unkey(thr, KEYBITS, ACC).to(ACC))
    if HAS_SUMS:
        tl.store(suml_ptr, sum_l)
        tl.store(sumd_ptr, sum_d)


@triton.jit
def _cpd_backward_kernel(
    gout_ptr,  # () upstream gradient of the loss
    s_ptr,     # (P,) student
    t_ptr,     # (P,) target
    thr_ptr,   # () ACC threshold value
    tie_ptr,   # () int64 tie index
    sumd_ptr,  # () ACC kept sum of d
    out_ptr,   # (P,) out: gradient w.r.t. student, student's dtype
    P,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < P
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=valid, other=0.0).to(ACC)
    tie = tl.load(tie_ptr)
    scale = tl.load(gout_ptr).to(ACC) / tl.load(sumd_ptr)
    l = (s - t) * (s - t)
    thr = tl.load(thr_ptr) + tl.zeros_like(l)  # a block: the interpreter cannot mix 0-d and block bools
    t_nan = thr != thr  # torch.sort's order: NaN above +inf, all NaNs equal
    less = (l < thr) | (t_nan & (l == l))
    equal = (l == thr) | (t_nan & (l != l))
    dropped = less | (equal & (offs < tie))
    v2 = 2 * (s - t)
    g = tl.where(dropped, v2 * 0.0, v2 * scale)  # dropped: 0, or NaN where s - t is not finite (as the loop)
    tl.store(out_ptr + offs, cast_to(g, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _cpd_mask_kernel(
    l_ptr,      # (P,) losses, any float dtype
    state_ptr,  # int64 [thr key bits, ...]
    tie_ptr,    # () int64 tie index
    out_ptr,    # (P,) uint8 out: 1 = kept (viewed as bool by the launcher)
    P,
    KEYBITS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < P
    key = _key(tl.load(l_ptr + offs, mask=valid, other=0.0), KEYBITS)
    thr = tl.load(state_ptr).to(tl.uint64, bitcast=True)
    tie = tl.load(tie_ptr)
    dropped = (key < thr) | ((key == thr) & (offs < tie))
    tl.store(out_ptr + offs, tl.where(dropped, 0, 1).to(tl.uint8), mask=valid)


# ----------------------------------------------------------------------------- launchers


def _keybits(dtype: torch.dtype) -> int:
    return {torch.float64: 64, torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}[dtype]


def _select(a: Tensor, b: Tensor, c: Tensor, P: int, k: int, from_l: bool, has_sums: bool, keybits: int,
            acc: torch.dtype):
    """Run the select passes; returns (state, tie, sum_l, sum_d, thr), the last four 0-d."""
    dev = a.device
    npass = keybits // DIGIT_BITS
    nblocks = triton.cdiv(P, BLOCK)
    ws = torch.zeros(npass * NBINS + 2, dtype=torch.int64, device=dev)  # histograms, then [prefix, krem]
    state = ws[npass * NBINS:]
    all_kept = k == 0
    ACC = acc_tl(acc)
    if not all_kept:
        state[1].fill_(k)
        for j in range(npass):
            shift = keybits - DIGIT_BITS * (j + 1)
            hist = ws[j * NBINS:(j + 1) * NBINS]
            _cpd_hist_kernel[(nblocks,)](a, b, state, hist, P, FROM_L=from_l, KEYBITS=keybits,
                                         SHIFT=shift, DB=DIGIT_BITS, BLOCK=BLOCK, ACC=ACC, num_warps=8)
            _cpd_select_kernel[(1,)](hist, state, SHIFT=shift, DB=DIGIT_BITS, num_warps=4)
    cnt = torch.empty(nblocks, dtype=torch.int64, device=dev)
    part = torch.empty((nblocks, 4) if has_sums else (1,), dtype=acc, device=dev)
    sum_l, sum_d, thr = (torch.empty((), dtype=acc, device=dev) for _ in range(3))
    tie = torch.empty((), dtype=torch.int64, device=dev)
    flags = dict(FROM_L=from_l, HAS_SUMS=has_sums, ALL_KEPT=all_kept, KEYBITS=keybits, BLOCK=BLOCK, ACC=ACC)
    _cpd_partials_kernel[(nblocks,)](a, b, c, state, cnt, part, P, num_warps=8, **flags)
    _cpd_finalize_kernel[(1,)](a, b, c, state, cnt, part, sum_l, sum_d, thr, tie, P, nblocks,
                               FBLOCK=FBLOCK, num_warps=8, **flags)
    return state, tie, sum_l, sum_d, thr


def cpd_forward(student: Tensor, target: Tensor, start: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    P = student.numel()
    acc = acc_torch(student.dtype)
    _, tie, sum_l, sum_d, thr = _select(student, target, start, P, k, False, True, _keybits(acc), acc)
    return sum_l, sum_d, thr, tie


def cpd_backward(grad_out: Tensor, student: Tensor, target: Tensor, start: Tensor, thr: Tensor, tie: Tensor,
                 sum_d: Tensor) -> Tensor:
    P = student.numel()
    out = torch.empty_like(student)
    if P == 0:
        return out
    _cpd_backward_kernel[(triton.cdiv(P, BLOCK),)](
        grad_out, student, target, thr, tie, sum_d, out, P, BLOCK=BLOCK, ACC=acc_tl(student.dtype), num_warps=8)
    return out


def cpd_keep_mask(l: Tensor, k: int) -> Tensor:
    P = l.numel()
    if P == 0 or k == 0:
        return torch.ones(P, dtype=torch.bool, device=l.device)
    out = torch.empty(P, dtype=torch.uint8, device=l.device)  # every element written by _cpd_mask_kernel
    keybits = _keybits(l.dtype)
    state, tie, *_ = _select(l, l, l, P, k, True, False, keybits, acc_torch(l.dtype))
    _cpd_mask_kernel[(triton.cdiv(P, BLOCK),)](l, state, tie, out, P, KEYBITS=keybits, BLOCK=BLOCK,
                                               num_warps=8)
    return out.view(torch.bool)
