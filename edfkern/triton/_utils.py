"""Launch heuristics and small device helpers shared by the Triton kernels.

Everything here is either a plain host function (block sizes, warps, dtype maps)
or a tiny ``@triton.jit`` helper inlined into the kernels of the op families.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import config
from .._checks import acc_dtype

#: Largest number of elements one program holds in registers for a fused row.
MAX_FUSED_SIZE = 65536


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def num_warps_for(block: int) -> int:
    """The usual ladder (Liger ``calculate_settings``, Triton's layer-norm tutorial)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def calculate_settings(n: int, max_block: int = 4096, lo: int = 16) -> tuple[int, int]:
    """Block size (next power of two of ``n``, clamped to ``[lo, max_block]``) and its ``num_warps``."""
    block = min(max_block, next_pow2(n, lo))
    if block > MAX_FUSED_SIZE:
        raise RuntimeError(f"edfkern.triton: fused size {block} exceeds the limit {MAX_FUSED_SIZE}")
    return block, num_warps_for(block)


acc_torch = acc_dtype  # float64 for float64 inputs, float32 otherwise (docs/ops.md)


def acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision() -> str:
    """IEEE fp32 products unless the caller opted into TF32 (``edfkern.config.allow_tf32``)."""
    return "tf32" if config.allow_tf32 else "ieee"


@triton.jit
def as_acc(s, ACC: tl.constexpr):
    """A host float scalar (an fp64 kernel argument) rounded once to ``ACC``, as torch rounds a Python scalar.

    Going through an explicit fp64 zero keeps full precision both compiled (where ``s``
    is an fp64 argument) and interpreted (where ``s`` arrives as a Python float).
    """
    return (tl.zeros([], tl.float64) + s).to(ACC)


@triton.jit
def bilinear(cam_ptr, y, x, h, w, H, W, ACC: tl.constexpr):
    """``F.interpolate(..., mode="bilinear", align_corners=False)`` of one (h, w) map at output (y, x).

    cam_ptr: base of the (h, w) map (any float dtype); y, x: int tensors of output coordinates.
    Same formula and operation order as PyTorch: src = scale*(dst+0.5)-0.5 clamped at 0,
    i1 = min(i0+1, in-1), out = hy*(hx*c00 + lx*c01) + ly*(hx*c10 + lx*c11),
    with the FMAs PyTorch's compiled kernels use.
    """
    scale_h = h.to(ACC) / H
    scale_w = w.to(ACC) / W
    # PyTorch's CPU and CUDA builds contract these into FMAs; we do it explicitly so the
    # result does not depend on the compiler's contraction choices.
    sy = tl.fma(scale_h, y.to(ACC) + 0.5, -0.5)
    sx = tl.fma(scale_w, x.to(ACC) + 0.5, -0.5)
    sy = tl.maximum(sy, 0.0)
    sx = tl.maximum(sx, 0.0)
    y0 = tl.minimum(sy.to(tl.int32), h - 1)
    x0 = tl.minimum(sx.to(tl.int32), w - 1)
    y1 = tl.minimum(y0 + 1, h - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    ly = sy - y0.to(ACC)
    lx = sx - x0.to(ACC)
    hy = 1.0 - ly
    hx = 1.0 - lx
    c00 = tl.load(cam_ptr + y0 * w + x0).to(ACC)
    c01 = tl.load(cam_ptr + y0 * w + x1).to(ACC)
    c10 = tl.load(cam_ptr + y1 * w + x0).to(ACC)
    c11 = tl.load(cam_ptr + y1 * w + x1).to(ACC)
    row0 = tl.fma(c01, lx, c00 * hx)
    row1 = tl.fma(c11, lx, c10 * hx)
    return tl.fma(row1, ly, row0 * hy)


#: The CPU interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even);
#: under TRITON_INTERPRET=1 the stores below round explicitly so results match torch.
BF16_RNE_FIX: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def cast_to(x, DT: tl.constexpr):
    """``x.to(DT)`` with round-to-nearest-even, also under the interpreter."""
    if BF16_RNE_FIX and DT == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        y = b.to(tl.float32, bitcast=True).to(DT)
    else:
        y = x.to(DT)
    return y


def device_sm_count() -> Optional[int]:
    """Multiprocessors of the device the launch heuristics size grids for: the current CUDA
    device's; None under the interpreter or without CUDA."""
    if interpreting() or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
