"""Grad-CAM (docs/ops.md) in Triton: one program per image does everything.

Kernel:
    _grad_cam_kernel  channel weights (gradcam / gradcam++ / smoothgradcam++), the
                      weighted channel sum, ReLU, min-max normalisation, and, when a size
                      is given, bilinear upsampling of the normalised (h, w) map, which it
                      writes to a tiny (N, h, w) scratch and reads back after a barrier.
Launcher: grad_cam (the backend contract).

Precision: the channel weights, the weighted sum and the normalisation accumulate in the
contract's acc dtype (fp32; fp64 for fp64 inputs), as docs/ops.md requires. gradcam++'s
alpha divides by 2*G^2 + sum(A*G^3), which can cancel, so results are compared with the
fp64 oracle by the "at most 2x torch's own fp32 error" rule.
The upsampling runs in the output dtype, exactly as torch's interpolate of the map.

Bytes: reads A and G once ((S+1)*N*C*h*w for smoothgradcam++ plus A_clean), writes N*H*W.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import acc_tl, acc_torch, bilinear, next_pow2

METHODS = {"gradcam": 0, "gradcam++": 1, "smoothgradcam++": 2}


@triton.jit
def _relu(x):
    """torch.relu: max(x, 0), and NaN stays NaN (tl.maximum may return the 0)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit(do_not_specialize=["S", "N", "C", "hw", "h", "w", "H", "W"])
def _grad_cam_kernel(
    a_ptr,       # (N, C, h, w) activations, or (S, N, C, h, w) for smoothgradcam++
    g_ptr,       # gradients, same shape as a_ptr
    aclean_ptr,  # (N, C, h, w) clean activations (smoothgradcam++ only; else any tensor)
    low_ptr,     # (N, h, w) out, fp32 or fp64: the low-res map (the result, or the scratch when UPSAMPLE)
    out_ptr,     # (N, H, W) out, low_ptr's dtype, when UPSAMPLE
    S, N, C, hw, h, w, H, W,
    METHOD: tl.constexpr, NORMALIZE: tl.constexpr, UPSAMPLE: tl.constexpr, SAME_SIZE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_OUT: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_HW)
    pvalid = p < hw
    cam = tl.zeros([BLOCK_HW], ACC)
    sstride = N.to(tl.int64) * C * hw  # elements per noisy sample
    last = (S - 1) * sstride  # offset of the last noisy sample (0 when S == 1)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c[:, None] < C) & pvalid[None, :]
        offs = (n * C + c[:, None]) * hw + p[None, :]  # int64
        A = tl.load(a_ptr + last + offs, mask=m, other=0.0).to(ACC)
        G = tl.load(g_ptr + last + offs, mask=m, other=0.0).to(ACC)
        if METHOD == 0:  # gradcam: w = mean_hw G
            wc = tl.sum(G, axis=1) / hw.to(ACC)
        elif METHOD == 1:  # gradcam++
            g2 = G * G
            g3 = g2 * G
            s = tl.sum(A * g3, axis=1)
            alpha = g2 / (2 * g2 + s[:, None] + 1e-8)
            wc = tl.sum(tl.where(m, alpha * _relu(G), 0.0), axis=1)
        else:  # smoothgradcam++: moments over the S noisy passes, clean activations in the denominator
            d2 = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
            d3 = tl.zeros([BLOCK_C, BLOCK_HW], ACC)
            for si in range(0, S):
                Gs = tl.load(g_ptr + si * sstride + offs, mask=m, other=0.0).to(ACC)
                g2s = Gs * Gs
                d2 += g2s
                d3 += g2s * Gs
            d2 = d2 / S.to(ACC)
            d3 = d3 / S.to(ACC)
            Ac = tl.load(aclean_ptr + offs, mask=m, other=0.0).to(ACC)
            s = tl.sum(Ac * d3, axis=1)
            alpha = d2 / (2 * d2 + s[:, None] + 1e-8)
            wc = tl.sum(tl.where(m, alpha * _relu(G), 0.0), axis=1)
        cam += tl.sum(wc[:, None] * A, axis=0)
    cam = _relu(cam)
    if NORMALIZE:  # as torch's amin / amax: a NaN anywhere in the map makes the whole map NaN
        any_nan = tl.sum(tl.where(pvalid & (cam != cam), 1, 0), axis=0) > 0
        lo = tl.min(tl.where(pvalid, cam, float("inf")), axis=0)
        cam = cam - tl.where(any_nan, float("nan"), lo)
        cam = cam / (tl.max(tl.where(pvalid, cam, float("-inf")), axis=0) + 1e-8)
    if SAME_SIZE:  # F.interpolate to the map's own size: inf * 1 + inf * 0 turns an infinity into NaN
        cam = cam + cam * 0.0
    tl.store(low_ptr + n * hw + p, cam.to(low_ptr.dtype.element_ty), mask=pvalid)
    if UPSAMPLE:
        tl.debug_barrier()  # the whole map must be visible before the gathers below
        HW = H * W
        for o0 in range(0, HW, BLOCK_OUT):
            q = o0 + tl.arange(0, BLOCK_OUT)
            qvalid = q < HW
            u = bilinear(low_ptr + n * hw, q // W, q % W, h, w, H, W, low_ptr.dtype.element_ty)
            tl.store(out_ptr + n * HW + q, u, mask=qvalid)


# ----------------------------------------------------------------------------- launcher


def grad_cam(A: Tensor, G: Tensor, A_clean: Optional[Tensor], method: str, normalize: bool,
             size: Optional[list[int]]) -> Tensor:
    smooth = method == "smoothgradcam++"
    if smooth:
        S, N, C, h, w = A.shape
    else:
        S = 1
        N, C, h, w = A.shape
    acc = acc_torch(A.dtype)
    hw = h * w
    upsample = size is not None and tuple(size) != (h, w)
    H, W = (h, w) if size is None else (int(size[0]), int(size[1]))
    low = torch.empty((N, h, w), dtype=acc, device=A.device)
    out = torch.empty((N, H, W), dtype=acc, device=A.device) if upsample else low
    if N == 0 or hw == 0:
        return out
    if C == 0:  # no channels: the weighted sum is 0 everywhere
        low.zero_()
        return low if not upsample else out.zero_()
    block_hw = next_pow2(hw)
    if block_hw > 16384:
        raise RuntimeError(f"edfkern.triton.grad_cam: maps of {hw} > 16384 positions exceed the fused-size limit")
    block_c = max(1, min(next_pow2(C), 2048 // block_hw))  # keep ~2K elements per array
    _grad_cam_kernel[(N,)](
        A, G, A_clean if smooth else A, low, out,
        S, N, C, hw, h, w, H, W,
        METHOD=METHODS[method], NORMALIZE=bool(normalize), UPSAMPLE=upsample,
        SAME_SIZE=size is not None and not upsample,
        BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_OUT=min(1024, next_pow2(H * W)), ACC=acc_tl(A.dtype),
        # smoothgradcam++ holds the two moment tiles besides A and G: at 4 warps its fp32 upsampling
        # path spilled 16 B per thread on sm_90 (python -m tools.gpucheck compile-sm90); 8 warps do not
        num_warps=8 if smooth else 4,
    )
    return out
