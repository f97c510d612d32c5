"""Quick, interleaved timing of CM, CC and DM against their floors and against ``torch.compile``.

Not part of the bench tool (``python -m edfkern.bench``): a probe for kernel work on a shared
machine. Every candidate of one op is timed round-robin in the same process (one call of each per
round, ``--reps`` rounds), so load spikes hit all of them alike; the figures are medians, and
the ratios are taken between medians of the same run. The ceilings (copy bandwidth, fp32
matmul rate) are measured in the same run, best of 10, and the load average is printed.

Candidates per op (cifar10-ipc1000 shapes, fp32, CPU):

* ``native`` / ``reference``: the public op under that backend (the bench's own cases,
  :func:`edfkern.bench.cases.make_case`, so the inputs are the bench's);
* ``compiled``: ``torch.compile`` of the natural vectorised formula (below), autograd included;
* ``gemm`` (CM only): just the GEMMs a one-GEMM-per-class kernel must run (``torch.mm`` of the
  centred (C, n_k L) class block with itself, forward; ``M_k Y_k`` backward), precomputed inputs.

Floors (benchmarks/NOTES.md, "CM, CC and DM against the floor"): CM counts one triangle per symmetric
Gram, ``N C (C+1) L`` FLOPs, plus ``2 N_syn C^2 L`` for the backward GEMM; CC and DM count the
bytes that must move (inputs read once, gradient written once).

    python benchmarks/perf_probe.py --ops cm,cc,dm --reps 30
    OMP_NUM_THREADS=1 python benchmarks/perf_probe.py --clock thread   # CPU time of one thread

``--clock thread`` (one thread only) times with ``time.thread_time``: the CPU time of the one
thread doing the work, which a loaded machine inflates far less than wall time (cache sharing
still does). The ceilings are then re-measured on the same clock (medians of 2048^2 matmuls and
of 256 MiB copies into an existing tensor), so time / floor compares like with like.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

import edfkern
from edfkern.bench.cases import make_case
from edfkern.bench.ceilings import measure_ceilings
from edfkern.bench.configs import get_config

CFG = get_config("cifar10-ipc1000")


def _cov(x: torch.Tensor, K: int) -> torch.Tensor:
    """(K, C, C) local covariance of (N, C, L) class-contiguous rows: the plain formula."""
    N, C, L = x.shape
    y = x.view(K, N // K, C, L)
    y = y - y.mean(1, keepdim=True)
    y = y.transpose(1, 2).reshape(K, C, -1)
    return torch.bmm(y, y.transpose(1, 2)) / (N // K)


def cm_formula(syn, real, K: int, w: float):
    d = _cov(real, K) - _cov(syn, K)
    return w * (d * d).sum()


def cc_formula(f, K: int, w: float):
    x = f.view(K, -1, f.shape[1])
    return w * ((x - x.mean(1, keepdim=True)) ** 2).sum()


def dm_formula(syn, real, K: int, w: float):
    d = real.view(K, -1, real.shape[1]).mean(1) - syn.view(K, -1, syn.shape[1]).mean(1)
    return w * (d * d).sum()


def _full(fn: Callable[[], torch.Tensor], leaf: torch.Tensor) -> Callable[[], None]:
    def run():
        leaf.grad = None
        fn().backward()
    return run


def _case_fn(op: str, provider: str, mode: str) -> Callable[[], None]:
    case = make_case(op, provider, mode, CFG)

    def run():
        case.reset()
        case.fn()
    return run


def _compiled(op: str, mode: str) -> Callable[[], None]:
    g = torch.Generator().manual_seed(1)
    K = CFG.K
    C, L = CFG.local
    if op == "covariance_matching_loss":
        syn = torch.randn(CFG.N, C, L, generator=g).requires_grad_(mode == "full")
        real = torch.randn(CFG.N_real, C, L, generator=g)
        f = torch.compile(cm_formula, dynamic=False)
        fwd, leaf = (lambda: f(syn, real, K, 0.01)), syn
    elif op == "class_centralization_loss":
        feat = torch.randn(CFG.N, CFG.cc_dim, generator=g).requires_grad_(mode == "full")
        f = torch.compile(cc_formula, dynamic=False)
        fwd, leaf = (lambda: f(feat, K, 0.05)), feat
    else:
        syn = torch.randn(CFG.N, C * L, generator=g).requires_grad_(mode == "full")
        real = torch.randn(CFG.N_real, C * L, generator=g)
        f = torch.compile(dm_formula, dynamic=False)
        fwd, leaf = (lambda: f(syn, real, K, 1.0)), syn
    run = _full(fwd, leaf) if mode == "full" else fwd
    for _ in range(3):  # compile and warm up outside the timing
        run()
    return run


def _gemm_only(mode: str) -> Callable[[], None]:
    """The GEMMs alone: per class, Y Y^T on the centred (C, n L) block (syn and real), and M Y (syn)."""
    C, L = CFG.local
    K = CFG.K
    g = torch.Generator().manual_seed(2)
    ys = [torch.randn(C, CFG.ipc * L, generator=g) for _ in range(K)]
    yr = [torch.randn(C, CFG.real_per_class * L, generator=g) for _ in range(K)]
    M = torch.randn(C, C, generator=g)
    out = torch.empty(C, CFG.ipc * L)

    def run():
        for y in ys + yr:
            torch.mm(y, y.t())
        if mode == "full":
            for y in ys:
                torch.mm(M, y, out=out)
    return run


def _thread_ceilings(reps: int = 10):
    """Copy and matmul ceilings on the thread-CPU-time clock (medians), as a Ceilings."""
    from edfkern.bench.ceilings import Ceilings

    def med(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            ts.append(time.thread_time() - t0)
        return statistics.median(ts)

    src = torch.rand(1 << 26)
    dst = torch.empty_like(src)
    t_copy = med(lambda: dst.copy_(src))
    n = 2048
    a, b = torch.rand(n, n), torch.rand(n, n)
    t_mm = med(lambda: a @ b)
    return Ceilings(copy_Bps=2 * src.numel() * 4 / t_copy, matmul_flops=2 * n ** 3 / t_mm, copy_bytes=src.numel() * 4,
                    matmul_n=n)


def floors(op: str, mode: str, ceil) -> tuple[float, str]:
    """(floor seconds, what it counts) at cifar10-ipc1000."""
    C, L = CFG.local
    ns, nr = CFG.N, CFG.N_real
    if op == "covariance_matching_loss":
        f = (ns + nr) * C * (C + 1) * L + (2 * ns * C * C * L if mode == "full" else 0)
        return f / ceil.matmul_flops, f"{f / 1e9:.2f} GFLOP (one triangle)"
    if op == "class_centralization_loss":
        b = CFG.N * CFG.cc_dim * 4 * (2 if mode == "full" else 1)
    else:
        b = (ns + nr) * C * L * 4 + (ns * C * L * 4 if mode == "full" else 0)
    return b / ceil.copy_Bps, f"{b / 1e6:.1f} MB"


SHORT = {"cm": "covariance_matching_loss", "cc": "class_centralization_loss", "dm": "mean_matching_loss"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default="cm,cc,dm")
    ap.add_argument("--modes", default="fwd,full")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--providers", default="native,reference,compiled,gemm")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"load average at start: {os.getloadavg()}, threads {torch.get_num_threads()}, clock {args.clock}")
    clock = time.perf_counter
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            raise SystemExit("--clock thread needs one thread (OMP_NUM_THREADS=1)")
        clock = time.thread_time
        ceil = _thread_ceilings()
    else:
        ceil = measure_ceilings("cpu")
    print(f"ceilings: copy {ceil.copy_Bps / 1e9:.1f} GB/s, matmul {ceil.matmul_flops / 1e9:.1f} GFLOP/s")
    provs = args.providers.split(",")
    for short in args.ops.split(","):
        op = SHORT[short]
        for mode in args.modes.split(","):
            cands: dict[str, Callable[[], None]] = {}
            for p in provs:
                if p in ("native", "reference"):
                    cands[p] = _case_fn(op, p, mode)
                elif p == "compiled":
                    cands[p] = _compiled(op, mode)
                elif p == "gemm" and short == "cm":
                    cands[p] = _gemm_only(mode)
            times: dict[str, list[float]] = {p: [] for p in cands}
            for fn in cands.values():
                fn()
            for _ in range(args.reps):
                for p, fn in cands.items():
                    t0 = clock()
                    fn()
                    times[p].append(clock() - t0)
            fl, what = floors(op, mode, ceil)
            med = {p: statistics.median(t) for p, t in times.items()}
            print(f"{op} {mode}: floor {fl * 1e3:.2f} ms ({what}); load {os.getloadavg()[0]:.2f}")
            for p, m in med.items():
                t = sorted(times[p])
                rel = "".join(f", {q}/{p} {med[q] / m:.2f}x" for q in ("compiled",) if q in med and q != p)
                print(f"  {p:10s} median {m * 1e3:8.2f} ms  p20 {t[len(t) // 5] * 1e3:8.2f}  "
                      f"p80 {t[4 * len(t) // 5] * 1e3:8.2f}  time/floor {m / fl:5.2f}{rel}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
