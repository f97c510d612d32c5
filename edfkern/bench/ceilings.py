"""The device's measured ceilings, taken once per run; every figure is reported against them.

* **Copy bandwidth**: ``dst.copy_(src)`` of a large fp32 tensor (256 MiB on CPU, 1 GiB on
  CUDA: far past every cache), counted as bytes read + bytes written over the best time.
* **fp32 matmul rate**: ``a @ b`` for square fp32 matrices (2048 on CPU, 8192 on CUDA),
  ``2 n^3`` FLOPs over the best time, in full IEEE fp32 (TF32 off, as the ops run
  unless ``edfkern.config.allow_tf32`` is set).

An op's floor is ``max(bytes / copy, FLOPs / matmul)``; its roofline fraction is that
floor over its measured time (see :mod:`edfkern.bench.cases` for each op's bytes and FLOPs).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .cases import _sync

__all__ = ["Ceilings", "measure_ceilings"]


@dataclass
class Ceilings:
    copy_Bps: float      # bytes read + written per second
    matmul_flops: float  # fp32 FLOP/s
    copy_bytes: int      # size of the copied tensor
    matmul_n: int

    def floor_s(self, bytes_moved: int, flops: int) -> float:
        return max(bytes_moved / self.copy_Bps, flops / self.matmul_flops)

    def bound(self, bytes_moved: int, flops: int) -> str:
        """``"memory"`` or ``"compute"``: which ceiling limits this op."""
        return "memory" if bytes_moved / self.copy_Bps >= flops / self.matmul_flops else "compute"

    def as_dict(self) -> dict:
        return asdict(self)


def _best_time(fn, sync, reps: int) -> float:
    """Fastest of ``reps`` calls: a ceiling is the best the device can do (other load only slows it)."""
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def measure_ceilings(device: str, *, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and fp32 matmul rate on ``device`` (``quick``: smaller, for tests)."""
    cuda = device.startswith("cuda")
    sync = _sync("cuda" if cuda else "cpu")
    n_copy = (1 << 28 if cuda else 1 << 26) >> (4 if quick else 0)  # fp32 elements: 1 GiB / 256 MiB
    src = torch.rand(n_copy, device=device)
    dst = torch.empty_like(src)
    t_copy = _best_time(lambda: dst.copy_(src), sync, 3 if quick else 10)
    copy_bytes = src.numel() * src.element_size()
    src = dst = None  # free 2 x 256 MiB before the matmul

    n = (8192 if cuda else 2048) // (2 if quick else 1)
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = _best_time(lambda: a @ b, sync, 3 if quick else 10)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return Ceilings(copy_Bps=2 * copy_bytes / t_copy, matmul_flops=2 * n ** 3 / t_mm, copy_bytes=copy_bytes,
                    matmul_n=n)
