"""Peak RSS of ``edfkern.trajectory_matching_loss`` alone, per student step, in fresh child processes.

    python benchmarks/trajectory_memory.py [--steps 10 80] [--width 128]

The student is the step bench's ConvNet (width 128, depth 3, 3x32x32, P = 320,010), batch 5 of 10
images. Prints the peak above the process before the call and the growth per step, which should be
one parameter vector (P x 4 bytes) per step.
"""
from __future__ import annotations

import argparse

import torch

import edfkern
from edfkern.bench import memory as M
from edfkern.bench.step_models import FlatStudent, flat_params, seeded_convnet


def peak(arg: tuple[int, int]) -> tuple[int, int]:
    steps, width = arg
    torch.set_num_threads(1)
    net = seeded_convnet(0, width=width, depth=3, size=32)
    student, start = FlatStudent(net), flat_params(net)
    target = start + 0.01 * torch.randn_like(start)
    x = torch.randn(10, 3, 32, 32, requires_grad=True)
    y = torch.arange(10)
    a = torch.tensor(0.01, requires_grad=True)

    def call(s: int) -> None:
        edfkern.trajectory_matching_loss(student, x, y, start, target, a, syn_steps=s, batch_syn=5).backward()

    call(1)
    M.trim_heap()
    M.reset_peak_rss()
    base = M.rss_bytes()
    call(steps)
    return M.peak_rss_bytes() - base, start.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs=2, default=[10, 80])
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args()
    (lo, n), (hi, _) = (M.run_isolated(peak, (s, args.width)) for s in args.steps)
    s0, s1 = args.steps
    per = (hi - lo) / (s1 - s0)
    print(f"P = {n}: peak {lo / 2**20:.1f} MiB at {s0} steps, {hi / 2**20:.1f} MiB at {s1}; "
          f"{per / 2**20:.2f} MiB per step = {per / (4 * n):.2f} P floats")


if __name__ == "__main__":
    main()
