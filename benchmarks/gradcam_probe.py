"""Interleaved timing of the native CPU Grad-CAM kernel against ``torch.compile`` of the plain formula.

smoothgradcam++ on the bench's layout: A, G ``(S, N, C, h, w)`` and A_clean ``(N, C, h, w)``, float32,
random data (A, A_clean uniform in [0, 1), G standard normal). Each round calls native, then the
compiled formula (:func:`edfkern.bench.compiled.grad_cam`), alternating so that the load of the shared
machine falls on both alike; prints medians of wall time and of process CPU time (all threads), the
bytes the op must read ((S + 2) N C h w elements: every G, A_last, A_clean) and the rate.

    PYTHONPATH=. python benchmarks/gradcam_probe.py [--n 2000] [--rounds 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import edfkern
from edfkern.bench import compiled as _compiled


def _time(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="images N")
    p.add_argument("--s", type=int, default=4, help="noisy passes S")
    p.add_argument("--c", type=int, default=512, help="channels C")
    p.add_argument("--hw", type=int, nargs=2, default=(4, 4), help="map size h w")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    p.add_argument("--no-compiled", action="store_true", help="time native only")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    h, w = a.hw
    A = torch.rand((a.s, a.n, a.c, h, w), generator=g)
    G = torch.randn((a.s, a.n, a.c, h, w), generator=g)
    A0 = torch.rand((a.n, a.c, h, w), generator=g)

    def native():
        with edfkern.use_backend("native"):
            return edfkern.grad_cam(A, G, method="smoothgradcam++", clean_activations=A0)

    comp = _compiled.compiled("grad_cam")

    def compiled():
        return comp(A, G, method="smoothgradcam++", clean_activations=A0)

    fns = {"native": native} if a.no_compiled else {"native": native, "compiled": compiled}
    for f in fns.values():  # warm: the native build, inductor's compile, first-touch pages
        f(); f()
    if not a.no_compiled:
        err = (native() - compiled()).abs().max().item()
        print(f"max |native - compiled| = {err:.3g}")
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(a.rounds):
        for k, f in fns.items():
            res[k].append(_time(f))
    nbytes = (a.s + 2) * a.n * a.c * h * w * A.element_size()
    print(f"S={a.s} N={a.n} C={a.c} h*w={h * w} threads={torch.get_num_threads()} "
          f"bytes={nbytes / 1e6:.1f} MB load={os.getloadavg()[0]:.2f}")
    med = {}
    for k, v in res.items():
        wall = statistics.median(t[0] for t in v)
        cpu = statistics.median(t[1] for t in v)
        med[k] = wall
        print(f"{k:9s} wall {wall * 1e3:8.2f} ms ({nbytes / wall / 1e9:5.1f} GB/s)  "
              f"cpu {cpu * 1e3:8.2f} ms  min wall {min(t[0] for t in v) * 1e3:8.2f} ms")
    if "compiled" in med:
        print(f"compiled / native (wall medians) = {med['compiled'] / med['native']:.2f}x")


if __name__ == "__main__":
    main()
