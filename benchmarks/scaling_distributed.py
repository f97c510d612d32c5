"""Scaling of edfkern.distributed on CPU (gloo): time per call at world sizes 1, 2 and 4.

    python benchmarks/scaling_distributed.py            # launches torchrun for each world size, prints the table
    torchrun --nproc-per-node 2 benchmarks/scaling_distributed.py --worker   # one world (rank 0 prints JSON)

Shapes: ``in1k-ipc50`` shrunk to fit a 2-core machine: K = 100 classes, 10 synthetic and 16 real
rows per class, local features 128 x 16, CC features 512, CPD P = 2,000,000; the rows of every class
(and the CPD vector) are split evenly over the ranks, so a world of W does 1/W of the work per rank.
Per op (forward + backward): median time per call on rank 0, payload bytes handed to collectives
per call and rank, and the share of the call spent waiting in collectives. On 2 cores a world of 4
oversubscribes the CPUs: its times measure contention as much as scaling.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

K, IPC, REAL, C, L, D, P = 100, 10, 16, 128, 16, 512, 2_000_000
REPEATS = 5


def worker() -> None:
    import datetime

    import torch
    import torch.distributed as dist

    import edfkern.distributed as ED

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    pg = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)

    def rows(per_class: int, *shape):
        mine = [j for j in range(per_class) if j % world == rank]
        labels = torch.arange(K).repeat_interleave(len(mine))
        return torch.randn(len(labels), *shape, generator=g), labels

    syn, ys = rows(IPC, C, L)
    real, yr = rows(REAL, C, L)
    feat, yf = rows(IPC, D)
    lo, hi = rank * P // world, (rank + 1) * P // world
    s, t, s0 = (torch.randn(hi - lo, generator=g) for _ in range(3))
    cases = {
        "covariance_matching_loss": lambda x: ED.covariance_matching_loss(
            x, real, syn_groups=ys, real_groups=yr, num_groups=K, process_group=pg),
        "local_covariance": lambda x: ED.local_covariance(x, groups=ys, num_groups=K, process_group=pg).sum(),
        "class_centralization_loss": lambda x: ED.class_centralization_loss(
            x, groups=yf, num_groups=K, process_group=pg),
        "mean_matching_loss": lambda x: ED.mean_matching_loss(
            x.flatten(1), real.flatten(1), syn_groups=ys, real_groups=yr, num_groups=K, process_group=pg),
        "cpd_trajectory_loss": lambda x: ED.cpd_trajectory_loss(x, t, s0, drop_ratio=0.375, process_group=pg),
    }
    inputs = {"class_centralization_loss": feat, "cpd_trajectory_loss": s}
    out = []
    for name, fn in cases.items():
        times, comm = [], []
        for _ in range(REPEATS + 1):
            x = inputs.get(name, syn).clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            with ED.record() as st:
                fn(x).backward()
            times.append(time.perf_counter() - t0)
            comm.append(st.seconds)
        op = "local_covariance" if name == "local_covariance" else name
        stats = ED.last_call_stats(op)
        i = sorted(range(1, REPEATS + 1), key=lambda j: times[j])[REPEATS // 2]  # median, first call dropped
        out.append(dict(op=name, world=world, ms=1e3 * times[i], bytes=stats.bytes, calls=stats.calls,
                        comm_share=comm[i] / times[i]))
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def main() -> int:
    rows: dict[str, dict[int, dict]] = {}
    for world in (1, 2, 4):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
               "127.0.0.1", "--master-port", str(29600 + world), __file__, "--worker"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        for r in json.loads(line[0][len("RESULT "):]):
            rows.setdefault(r["op"], {})[world] = r
    print(f"K={K}, IPC={IPC} syn + {REAL} real rows/class, features {C}x{L} (CC {D}), CPD P={P}; "
          f"fwd+bwd, median of {REPEATS}, rank 0; gloo on {os.cpu_count()} CPUs (world 4 oversubscribes)")
    print("| op | ms W=1 | ms W=2 | ms W=4 | bytes/call/rank W=1, 2, 4 | collectives | comm share W=2 | W=4 |")
    print("|---|---|---|---|---|---|---|---|")
    for op, by in rows.items():
        print(f"| {op} | {by[1]['ms']:.1f} | {by[2]['ms']:.1f} | {by[4]['ms']:.1f} | "
              f"{by[1]['bytes']}, {by[2]['bytes']}, {by[4]['bytes']} | {by[2]['calls']} | "
              f"{100 * by[2]['comm_share']:.0f}% | {100 * by[4]['comm_share']:.0f}% |")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        raise SystemExit(main())
