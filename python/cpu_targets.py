"""CPU speed and memory targets of the native backend (SPEC section 8, "On CPU, with no GPU").

At config ``cifar10-ipc1000`` (K=10, IPC=1000, images 3x32x32, local features (N,128,16) with
256 real rows per class, CC features 512-d), the public ops under the ``native`` backend are
timed side by side with the loop formulations of ``edfkern.baselines``, in one process:

* ``dae_`` with a 4x4 CAM upsampled to 32x32 (target >= 10x),
* ``class_centralization_loss`` forward + backward (target >= 10x),
* ``covariance_matching_loss`` forward + backward, gradient to ``syn`` only (target >= 4x),

and the CM loss's peak resident memory (VmHWM) is measured in a fresh child process per side
(target >= 2.5x lower). Each timing is the median of ``--repeats`` runs (``--loop-repeats`` for
the loops) after one warm-up, loop and native runs alternating.

    python python/cpu_targets.py [--repeats 5] [--loop-repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

try:
    import edfkern
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import edfkern
from edfkern import baselines

K, IPC, REAL = 10, 1000, 256
N = K * IPC


def interleaved(loop, native, extra, loop_repeats: int, repeats: int) -> tuple[float, float, float]:
    """Medians of loop and native runs taken alternately (the load of a shared machine drifts),
    each minus the median time of ``extra`` (work both sides repeat, e.g. restoring the input)."""
    t0 = time.perf_counter()
    loop()  # warm-up; a loop slower than 2 s is warm after its first run and that run counts
    first = time.perf_counter() - t0
    for fn in (native, extra):
        if fn is not None:
            fn()
    tl, tn, te = ([first] if first > 2.0 else []), [], []
    for i in range(max(loop_repeats, repeats)):
        for fn, ts, reps in ((loop, tl, loop_repeats), (native, tn, repeats), (extra, te, repeats)):
            if fn is not None and len(ts) < reps:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    e = statistics.median(te) if te else 0.0
    return statistics.median(tl) - e, statistics.median(tn) - e, e


# ----------------------------------------------------------------------------- cases


def dae_case():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(N, 3, 32, 32, generator=g)
    cam = torch.rand(N, 4, 4, generator=g)
    work = grad.clone()

    def loop():
        work.copy_(grad)
        baselines.dae_(work, cam, beta=1.0)

    def native():
        work.copy_(grad)
        with edfkern.use_backend("native"):
            edfkern.dae_(work, cam, beta=1.0)

    def copy_only():
        work.copy_(grad)

    return loop, native, copy_only


def cc_case():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(N, 512, generator=g).requires_grad_()

    def loop():
        feat.grad = None
        baselines.class_centralization_loss(feat, groups=K).backward()

    def native():
        feat.grad = None
        with edfkern.use_backend("native"):
            edfkern.class_centralization_loss(feat, groups=K).backward()

    return loop, native, None


def cm_inputs():
    g = torch.Generator().manual_seed(2)
    syn = torch.randn(N, 128, 16, generator=g).requires_grad_()
    real = torch.randn(K * REAL, 128, 16, generator=g)
    return syn, real


def cm_case():
    syn, real = cm_inputs()

    def loop():
        syn.grad = None
        baselines.covariance_matching_loss(syn, real, syn_groups=K, real_groups=K).backward()

    def native():
        syn.grad = None
        with edfkern.use_backend("native"):
            edfkern.covariance_matching_loss(syn, real, syn_groups=K, real_groups=K).backward()

    return loop, native, None


# ----------------------------------------------------------------------------- memory (child process)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(side: str) -> None:
    """Run one CM forward + backward and print 'peak_bytes rss_before_bytes'."""
    # Both sides warm up both implementations on tiny inputs first, so that libraries, thread pools
    # and the extension are loaded before the measurement starts, whichever side is measured.
    a, b = torch.randn(4, 3, 2, requires_grad=True), torch.randn(4, 3, 2)
    with edfkern.use_backend("native"):
        edfkern.covariance_matching_loss(a, b, syn_groups=2, real_groups=2).backward()
    baselines.covariance_matching_loss(a, b, syn_groups=2, real_groups=2).backward()
    syn, real = cm_inputs()
    before = _status("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if side == "native":
        with edfkern.use_backend("native"):
            edfkern.covariance_matching_loss(syn, real, syn_groups=K, real_groups=K).backward()
    else:
        baselines.covariance_matching_loss(syn, real, syn_groups=K, real_groups=K).backward()
    print(_status("VmHWM"), before)


def peak(side: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side], check=True,
                         capture_output=True, text=True, env=dict(os.environ)).stdout.split()
    return int(out[-2]), int(out[-1])


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the native ops")
    ap.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the (slow) loop baselines")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--child", choices=["native", "loop"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child)
        return
    info = edfkern.backends()["native"]
    if not info["available"]:
        sys.exit(f"native backend unavailable: {info['reason']}")
    print(f"cifar10-ipc1000 on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} runs (loops: {args.loop_repeats})")
    rows = []
    for name, target, case in (("dae_ (cam 4x4 -> 32x32)", 10.0, dae_case),
                               ("class_centralization_loss fwd+bwd", 10.0, cc_case),
                               ("covariance_matching_loss fwd+bwd", 4.0, cm_case)):
        loop, native, extra = case()
        t_loop, t_nat, t_extra = interleaved(loop, native, extra, args.loop_repeats, args.repeats)
        ratio = t_loop / t_nat
        rows.append((name, t_loop, t_nat, ratio, target))
        print(f"{name:36s} loop {t_loop * 1e3:9.2f} ms   native {t_nat * 1e3:8.2f} ms   "
              f"speedup {ratio:7.1f}x  (target >= {target:g}x: {'PASS' if ratio >= target else 'FAIL'})", flush=True)
    (p_loop, b_loop), (p_nat, b_nat) = peak("loop"), peak("native")
    r_abs = p_loop / p_nat
    r_ws = (p_loop - b_loop) / max(1, p_nat - b_nat)
    print(f"{'CM fwd+bwd peak RSS (VmHWM)':36s} loop {p_loop / 2**20:9.1f} MB   native {p_nat / 2**20:8.1f} MB   "
          f"ratio {r_abs:7.2f}x  (target >= 2.5x: {'PASS' if r_abs >= 2.5 else 'FAIL'})")
    print(f"{'CM fwd+bwd peak above inputs':36s} loop {(p_loop - b_loop) / 2**20:9.1f} MB   native "
          f"{(p_nat - b_nat) / 2**20:8.1f} MB   ratio {r_ws:7.2f}x")


if __name__ == "__main__":
    main()
