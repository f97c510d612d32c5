"""DAE (docs/ops.md) in Triton: the mask is computed on the fly from the low-res CAM.

Kernels, top-down:
    _dae_stats_kernel  per image, tau_i = mean of U(cam_i), computed from the (h, w) map
                       with separable row/column weight sums (no (H, W) map; NaN / inf in
                       the CAM take the mean of U itself), and the value of a flat map.
    _dae_apply_kernel  one program per (pixel tile, image): U(cam) and the mask for the
                       tile, then, by MODE, store the mask / scale grad / one SGD step
                       over all C channels of the tile.
Launchers: dae_mask, dae_, dae_sgd_step_ (the backend contract).

Bytes (fp32, N*C*H*W = E elements): dae_ reads+writes grad (8E); dae_sgd_step_ reads
grad, param, buf and writes param, buf (20E). The CAM (N*h*w) and tau (N) are noise.
Workspace: tau and the flat values, 2N elements. Special values and flat maps:
docs/special-values.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import acc_tl, acc_torch, as_acc, bilinear, calculate_settings, cast_to, next_pow2

MODE_MASK, MODE_SCALE, MODE_SGD = 0, 1, 2


@triton.jit
def _axis_weight_sums(n_in, n_out, a, BLOCK_O: tl.constexpr, ACC: tl.constexpr):
    """For input indices ``a`` (vector), sum over all output positions of their bilinear weight."""
    scale = n_in.to(ACC) / n_out
    acc = tl.zeros(a.shape, ACC)
    for o0 in range(0, n_out, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        valid = o < n_out
        s = tl.maximum(scale * (o.to(ACC) + 0.5) - 0.5, 0.0)
        i0 = tl.minimum(s.to(tl.int32), n_in - 1)
        i1 = tl.minimum(i0 + 1, n_in - 1)
        lam = s - i0.to(ACC)
        w = tl.where(i0[:, None] == a[None, :], 1.0 - lam[:, None], 0.0) \
            + tl.where(i1[:, None] == a[None, :], lam[:, None], 0.0)
        acc += tl.sum(tl.where(valid[:, None], w, 0.0), axis=0)
    return acc


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _dae_stats_kernel(
    cam_ptr,   # (N, h, w) low-res CAMs, any float dtype
    tau_ptr,   # (N,) out: per-image mean of the upsampled map, ACC (not written when FIXED_THR)
    flat_ptr,  # (N,) out: the value of a flat map (all entries equal and finite), else NaN, ACC
    h, w, H, W,
    FIXED_THR: tl.constexpr,  # a fixed threshold: only the flat values are needed
    IDENTITY: tl.constexpr,   # (h, w) == (H, W): U is the identity (up to inf -> NaN)
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    ACC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    base = cam_ptr + n * h * w
    total = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    lo = tl.full([BLOCK_A, BLOCK_B], float("inf"), ACC)
    hi = tl.full([BLOCK_A, BLOCK_B], float("-inf"), ACC)
    nonfinite = tl.zeros([BLOCK_A, BLOCK_B], tl.int32)
    for a0 in range(0, h, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        if not IDENTITY and not FIXED_THR:
            rw = _axis_weight_sums(h, H, a, BLOCK_O, ACC)
        for b0 in range(0, w, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            m = (a[:, None] < h) & (b[None, :] < w)
            c = tl.load(base + a[:, None] * w + b[None, :], mask=m, other=0.0).to(ACC)
            nonfinite += tl.where(m & ((c - c) != 0.0), 1, 0)  # NaN or +-inf
            lo = tl.minimum(lo, tl.where(m, c, float("inf")))
            hi = tl.maximum(hi, tl.where(m, c, float("-inf")))
            if not FIXED_THR:
                if IDENTITY:
                    total += c
                else:
                    cw = _axis_weight_sums(w, W, b, BLOCK_O, ACC)
                    total += c * rw[:, None] * cw[None, :]
    n_bad = tl.sum(tl.sum(nonfinite, axis=1), axis=0)
    lo_s = tl.min(tl.min(lo, axis=1), axis=0)
    hi_s = tl.max(tl.max(hi, axis=1), axis=0)
    flat = (n_bad == 0) & (lo_s == hi_s)
    tl.store(flat_ptr + n, tl.where(flat, lo_s, float("nan")))
    if not FIXED_THR:
        tau = tl.sum(tl.sum(total, axis=1), axis=0) / (H * W).to(ACC)
        if n_bad > 0:
            # NaN / inf in the CAM: the mean of the upsampled map itself, which is NaN or +-inf exactly
            # when the loop's is (a zero weight on an infinity gives NaN; unused pixels do nothing)
            full = tl.zeros([BLOCK_F], ACC)
            for o0 in range(0, H * W, BLOCK_F):
                q = o0 + tl.arange(0, BLOCK_F)
                qv = q < H * W
                if IDENTITY:
                    u = tl.load(base + q, mask=qv, other=0.0).to(ACC)
                    u = u + u * 0.0
                else:
                    u = bilinear(base, q // W, q % W, h, w, H, W, ACC)
                full += tl.where(qv, u, 0.0)
            tau = tl.sum(full, axis=0) / (H * W).to(ACC)
        tl.store(tau_ptr + n, tl.where(flat, lo_s, tau))


@triton.jit(do_not_specialize=["C", "h", "w", "H", "W"])
def _dae_apply_kernel(
    cam_ptr,    # (N, h, w) low-res CAMs
    tau_ptr,    # (N,) per-image thresholds, ACC (unused when FIXED_THR)
    flat_ptr,   # (N,) value of each flat map, else NaN, ACC: a flat map upsamples to its value exactly
    out_ptr,    # MODE_MASK: (N, 1, H, W) mask out; MODE_SCALE: (N, C, H, W) grad, in/out
    grad_ptr,   # MODE_SGD: (N, C, H, W) gradient, read only
    param_ptr,  # MODE_SGD: (N, C, H, W) parameter, in/out
    buf_ptr,    # MODE_SGD: (N, C, H, W) momentum buffer, in/out (unused unless HAS_MOM)
    C, h, w, H, W,
    beta: tl.float64, thr: tl.float64,
    lr: tl.float64, momentum: tl.float64, damp1: tl.float64, weight_decay: tl.float64,
    MODE: tl.constexpr, IDENTITY: tl.constexpr, FIXED_THR: tl.constexpr,
    HAS_MOM: tl.constexpr, HAS_WD: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    FIRST: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    p = pid * BLOCK + tl.arange(0, BLOCK)
    valid = p < HW
    y = p // W
    x = p % W
    cam = cam_ptr + n * h * w
    if IDENTITY:
        u = tl.load(cam + p, mask=valid, other=0.0).to(ACC)
        u = u + u * 0.0  # what F.interpolate computes at the same size: inf -> NaN
    else:
        u = bilinear(cam, y, x, h, w, H, W, ACC)
    fv = tl.load(flat_ptr + n)
    u = tl.where(fv == fv, fv, u)
    if FIXED_THR:
        tau = as_acc(thr, ACC)
    else:
        tau = tl.load(tau_ptr + n)
    mask = tl.where(u >= tau, u + as_acc(beta, ACC), 1.0)

    if MODE == 0:
        tl.store(out_ptr + n * HW + p, cast_to(mask, out_ptr.dtype.element_ty), mask=valid)
    elif MODE == 1:
        for c in range(0, C):
            offs = (n * C + c) * HW + p  # int64
            g = tl.load(out_ptr + offs, mask=valid, other=0.0).to(ACC)
            tl.store(out_ptr + offs, cast_to(g * mask, out_ptr.dtype.element_ty), mask=valid)
    else:
        lr_a = as_acc(lr, ACC)
        mom_a = as_acc(momentum, ACC)
        damp_a = as_acc(damp1, ACC)
        wd_a = as_acc(weight_decay, ACC)
        for c in range(0, C):
            offs = (n * C + c) * HW + p  # int64
            d = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(ACC) * mask
            prm = tl.load(param_ptr + offs, mask=valid, other=0.0).to(ACC)
            if MAXIMIZE:
                d = -d
            if HAS_WD:
                d = d + wd_a * prm
            if HAS_MOM:
                if FIRST:
                    b = d
                else:
                    b = tl.load(buf_ptr + offs, mask=valid, other=0.0).to(ACC) * mom_a + damp_a * d
                b_st = cast_to(b, buf_ptr.dtype.element_ty)
                tl.store(buf_ptr + offs, b_st, mask=valid)
                b = b_st.to(ACC)  # the stored (rounded) buffer feeds the update, as in torch
                if NESTEROV:
                    d = d + mom_a * b
                else:
                    d = b
            tl.store(param_ptr + offs, cast_to(prm - lr_a * d, param_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- launchers


def _stats(cam: Tensor, H: int, W: int, threshold: Optional[float], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-image thresholds (N,) (a 1-element dummy when the threshold is fixed) and flat values (N,), in acc."""
    n, h, w = cam.shape
    ws = torch.empty(2 * n if threshold is None else n + 1, dtype=acc, device=cam.device)
    flat, tau = ws[:n], ws[n:]
    _dae_stats_kernel[(n,)](
        cam, tau, flat, h, w, H, W,
        FIXED_THR=threshold is not None, IDENTITY=(h, w) == (H, W),
        BLOCK_A=min(64, next_pow2(h)), BLOCK_B=min(64, next_pow2(w)), BLOCK_O=min(128, next_pow2(max(H, W))),
        BLOCK_F=min(1024, next_pow2(H * W)), ACC=acc_tl(acc),
        num_warps=8 if acc == torch.float64 else 4,  # fp64 spilled 4 B per thread on sm_90 at 4 warps
    )
    return tau, flat


def _apply(mode: int, cam: Tensor, H: int, W: int, C: int, beta: float, threshold: Optional[float],
           out: Tensor, grad: Tensor, param: Tensor, buf: Optional[Tensor], lr: float = 0.0,
           momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
           maximize: bool = False, first_step: bool = False) -> None:
    n, h, w = cam.shape
    if n == 0 or H * W == 0 or C == 0:
        return
    acc = acc_torch(cam.dtype, param.dtype)  # float64 if either is float64
    tau, flat = _stats(cam, H, W, threshold, acc)
    block, warps = calculate_settings(H * W, max_block=1024, lo=16)
    grid = (triton.cdiv(H * W, block), n)
    _dae_apply_kernel[grid](
        cam, tau, flat, out, grad, param, buf if buf is not None else param,
        C, h, w, H, W,
        float(beta), float(threshold) if threshold is not None else 0.0,
        float(lr), float(momentum), float(1.0 - dampening), float(weight_decay),
        MODE=mode, IDENTITY=(h, w) == (H, W), FIXED_THR=threshold is not None,
        HAS_MOM=buf is not None, HAS_WD=weight_decay != 0, NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize), FIRST=bool(first_step),
        BLOCK=block, ACC=acc_tl(acc), num_warps=warps,
    )


def dae_mask(cam: Tensor, beta: float, threshold: Optional[float], H: int, W: int) -> Tensor:
    out = torch.empty((cam.shape[0], 1, H, W), dtype=cam.dtype, device=cam.device)
    _apply(MODE_MASK, cam, H, W, 1, beta, threshold, out, out, out, None)
    return out


def dae_(grad: Tensor, cam: Tensor, beta: float, threshold: Optional[float]) -> None:
    _, C, H, W = grad.shape
    _apply(MODE_SCALE, cam, H, W, C, beta, threshold, grad, grad, grad, None)


def dae_sgd_step_(param: Tensor, grad: Tensor, buf: Optional[Tensor], cam: Tensor, lr: float, beta: float,
                  threshold: Optional[float], momentum: float, dampening: float, weight_decay: float,
                  nesterov: bool, maximize: bool, first_step: bool) -> None:
    _, C, H, W = param.shape
    _apply(MODE_SGD, cam, H, W, C, beta, threshold, param, grad, param, buf,
           lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
