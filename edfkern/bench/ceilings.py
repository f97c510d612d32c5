"""The device's measured ceilings; every achieved rate is reported against them, never above 100%.

* **Streaming bandwidth** (``copy_Bps``): the best of three streaming kernels over a buffer far past
  every cache (256 MiB fp32 on CPU, 1 GiB on CUDA), each counted as the bytes it reads plus the
  bytes it writes, over its best time: ``dst.copy_(src)``, an in-place ``x.mul_(c)`` (read and
  write the same bytes, as ``dae_`` does) and a read-only ``x.sum()``. On a CPU a plain copy is
  the slowest of the three: the first store to each line of ``dst`` reads it first (write
  allocate), so a copy moves 3 bytes for the 2 it is credited with; an in-place update does not.
* **Streaming bandwidth at an op's own size** (``at_size``): the same three kernels with the op's
  traffic (its modelled bytes) as theirs. An op whose bytes partly stay in L2/L3 can honestly beat
  the DRAM figure; its ceiling is the better of the two. Sizes at or above the big buffer's
  traffic use the big buffer's figure.
* **fp32 matmul rate**: ``a @ b`` for square fp32 matrices (2048 on CPU, 8192 on CUDA),
  ``2 n^3`` FLOPs over the best time, in full IEEE fp32 (TF32 off, as the ops run
  unless ``edfkern.config.allow_tf32`` is set).

The CLI measures at the start and at the end of a run and keeps the best of each (other load
only slows a ceiling down). :func:`settle` then applies the rule that no fraction above 100% is
printed: an achieved rate above its ceiling means the measurement was disturbed, so the ceilings
are re-measured (a few tries); a rate still above them becomes its own ceiling estimate, and a
note says so. benchmarks/NOTES.md has the measurements behind these choices.

An op's floor is ``max(bytes / bandwidth, FLOPs / matmul)``; its roofline fraction is that
floor over its measured time (see :mod:`edfkern.bench.cases` for each op's bytes and FLOPs).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from .cases import _sync

__all__ = ["Ceilings", "measure_ceilings", "measure_at_sizes", "stream_rate", "apply", "settle"]


@dataclass
class Ceilings:
    copy_Bps: float      # best streaming rate, bytes read + written per second, at copy_bytes
    matmul_flops: float  # fp32 FLOP/s
    copy_bytes: int      # size of the streamed buffer (a copy moves 2x this)
    matmul_n: int
    copy_kernel: str = "copy_"                                 # the streaming kernel that gave copy_Bps
    at_size: dict[int, float] = field(default_factory=dict)    # traffic bytes -> best streaming rate there

    def mem_Bps(self, bytes_moved: int) -> float:
        """The bandwidth ceiling of an op that moves ``bytes_moved``: DRAM, or better at its own size."""
        return max(self.copy_Bps, self.at_size.get(int(bytes_moved), 0.0))

    def floor_s(self, bytes_moved: int, flops: int) -> float:
        return max(bytes_moved / self.mem_Bps(bytes_moved), flops / self.matmul_flops)

    def bound(self, bytes_moved: int, flops: int) -> str:
        """``"memory"`` or ``"compute"``: which ceiling limits this op (judged at the DRAM bandwidth)."""
        return "memory" if bytes_moved / self.copy_Bps >= flops / self.matmul_flops else "compute"

    def best(self, other: "Ceilings") -> "Ceilings":
        """The better of two measurements, figure by figure (other load only slows a ceiling)."""
        sizes = {**self.at_size}
        for k, v in other.at_size.items():
            sizes[k] = max(v, sizes.get(k, 0.0))
        copy = max((self, other), key=lambda c: c.copy_Bps)
        mm = max((self, other), key=lambda c: c.matmul_flops)
        return Ceilings(copy.copy_Bps, mm.matmul_flops, copy.copy_bytes, mm.matmul_n, copy.copy_kernel, sizes)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["at_size"] = {str(k): v for k, v in self.at_size.items()}
        return d


def call_times(fn: Callable[[], object], device: str, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` (the device synchronised after each), after one warm-up call."""
    sync = _sync(device)
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return ts


def _best_time(fn, device: str, reps: int) -> float:
    """Fastest of ``reps`` calls: a ceiling is the best the device can do (other load only slows it)."""
    return min(call_times(fn, device, reps))


def stream_rate(device: str, traffic_bytes: int, reps: int) -> tuple[float, str]:
    """(bytes/s, kernel): the best of copy_, in-place mul_ and read-only sum, each moving ``traffic_bytes``."""
    n = max(1024, traffic_bytes // 8)  # fp32 elements of a half-traffic buffer
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    rates = {"copy_": 8 * n / _best_time(lambda: dst.copy_(src), device, reps),
             "in-place mul_": 8 * n / _best_time(lambda: src.mul_(1.0), device, reps)}
    del dst
    whole = torch.rand(2 * n, device=device)
    rates["read-only sum"] = 8 * n / _best_time(lambda: whole.sum(), device, reps)
    kernel = max(rates, key=rates.get)
    return rates[kernel], kernel


def measure_ceilings(device: str, *, quick: bool = False) -> Ceilings:
    """Measure streaming bandwidth and fp32 matmul rate on ``device`` (``quick``: smaller, for tests)."""
    cuda = device.startswith("cuda")
    copy_bytes = (1 << 30 if cuda else 1 << 28) >> (4 if quick else 0)  # 1 GiB / 256 MiB buffer
    bps, kernel = stream_rate(device, 2 * copy_bytes, 3 if quick else 10)

    n = (8192 if cuda else 2048) // (2 if quick else 1)
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = _best_time(lambda: a @ b, device, 3 if quick else 10)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return Ceilings(copy_Bps=bps, matmul_flops=2 * n ** 3 / t_mm, copy_bytes=copy_bytes, matmul_n=n,
                    copy_kernel=kernel)


def measure_at_sizes(ceil: Ceilings, device: str, sizes: Iterable[int], *, quick: bool = False) -> Ceilings:
    """``ceil`` with :func:`stream_rate` at each op traffic size below the big buffer's (best kept)."""
    out = replace(ceil, at_size=dict(ceil.at_size))
    for s in sorted({int(s) for s in sizes}):
        if 0 < s < 2 * ceil.copy_bytes:
            rate, _ = stream_rate(device, s, 3 if quick else 10)
            out.at_size[s] = max(rate, out.at_size.get(s, 0.0))
    return out


# ----------------------------------------------------------------------------- the 100% rule


def apply(results: list[dict], ceil: Ceilings) -> list[dict]:
    """Set ``bound``, the achieved rates, ``ceiling`` and ``of_ceiling`` on every ok result with a
    cost model; return the ones whose achieved rate is above their ceiling."""
    over = []
    for r in results:
        if r.get("status") != "ok" or r.get("bytes_moved") is None:
            continue
        bound = ceil.bound(r["bytes_moved"], r["flops"])
        r["bound"] = bound
        r["achieved_Bps"] = r["bytes_moved"] / r["median"]
        r["achieved_flops"] = r["flops"] / r["median"]
        achieved = r["achieved_Bps"] if bound == "memory" else r["achieved_flops"]
        r["ceiling"] = ceil.mem_Bps(r["bytes_moved"]) if bound == "memory" else ceil.matmul_flops
        r["ceiling_source"] = "measured"
        r["of_ceiling"] = achieved / r["ceiling"]
        if r["of_ceiling"] > 1.0:
            over.append(r)
    return over


def _who(rs: list[dict]) -> str:
    return ", ".join(f"{r['op']} {r['provider']} {r['mode']} {100 * r['of_ceiling']:.0f}%" for r in rs)


def settle(results: list[dict], ceil: Ceilings, remeasure: Callable[[list[int]], Ceilings], *,
           tries: int = 3) -> tuple[Ceilings, list[str]]:
    """Apply the ceilings; while some achieved rate exceeds its ceiling, re-measure (``tries`` times).

    ``remeasure(sizes)`` returns a fresh measurement including the traffic ``sizes`` of the ops
    that were over; the best of old and new is kept. A rate still above every measurement
    becomes its own ceiling estimate (``ceiling_source = "achieved"``, 100%). Returns the final
    ceilings and the notes to print (none when nothing was over), each one line.
    """
    over = apply(results, ceil)
    if not over:
        return ceil, []
    notes = [f"ceiling measurement disturbed: achieved above the measured ceiling for {_who(over)}; "
             f"re-measuring (up to {tries} tries)"]
    n = 0
    while over and n < tries:
        n += 1
        ceil = ceil.best(remeasure(sorted({r["bytes_moved"] for r in over})))
        over = apply(results, ceil)
    if not over:
        notes.append(f"re-measured ceilings after {n} tr{'y' if n == 1 else 'ies'}: every achieved rate is now "
                     f"within its ceiling")
        return ceil, notes
    for r in over:
        r["ceiling"] = r["achieved_Bps"] if r["bound"] == "memory" else r["achieved_flops"]
        r["ceiling_source"] = "achieved"
        r["of_ceiling"] = 1.0
    names = ", ".join(f"{r['op']} {r['provider']} {r['mode']}" for r in over)
    notes.append(f"still above the ceiling after {n} re-measurements: {names}; their achieved rate is used as "
                 "the ceiling estimate (shown as 100%)")
    return ceil, notes
