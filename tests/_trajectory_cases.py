"""Shared pieces of the trajectory-matching tests: a DD ConvNet student with instance norm, data, and
the authors' loop as the oracle (:func:`edfkern.baselines.trajectory_matching_loop`).

Imported by ``tests/test_trajectory.py`` and run as a script by its distributed test
(``tests/_dist_launch.run_world(..., script="_trajectory_cases.py")``):
``python tests/_trajectory_cases.py RANK WORLD OUTDIR`` joins a gloo world (MASTER_ADDR/PORT from the
environment, every collective bounded by EDFKERN_DIST_TIMEOUT), runs every case with the process group,
and writes ``OUTDIR/rank{RANK}.json``: ``{case: "ok" | traceback}``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import edfkern  # noqa: E402
from edfkern import baselines  # noqa: E402
from edfkern.bench.step_models import FlatStudent, flat_params, seeded_convnet  # noqa: E402

K, SIZE = 4, 8


@dataclass
class Case:
    """One trajectory-matching problem: a student, its start/target, and the synthetic set."""

    student: FlatStudent
    start: torch.Tensor
    target: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    syn_lr: torch.Tensor


def make_case(n: int = 10, *, soft: bool = False, dtype: torch.dtype = torch.float64, width: int = 6, depth: int = 2,
              seed: int = 0) -> Case:
    """A ConvNet (conv - instance norm - ReLU - avgpool, ``depth`` blocks) at 8x8, K = 4 classes,
    target a random perturbation of start, fresh random images (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    net = seeded_convnet(seed, dtype=dtype, width=width, depth=depth, size=SIZE, channels=3, num_classes=K)
    start = flat_params(net)
    target = start + 0.05 * torch.randn(start.numel(), generator=g, dtype=dtype)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=dtype)
    labels = (torch.randn(n, K, generator=g, dtype=dtype).softmax(-1) if soft
              else torch.arange(n) % K)
    return Case(FlatStudent(net), start, target, images, labels, torch.tensor(0.05, dtype=dtype))


def dsa_like(x: torch.Tensor) -> torch.Tensor:
    """A DSA-like augmentation drawing from torch's default RNG: per-image scale and flip, additive noise."""
    b = x.shape[0]
    scale = 1 + 0.2 * (torch.rand(b, 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)
    flip = torch.rand(b, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x) * scale
    return x + 0.05 * torch.randn_like(x)


def grads(case: Case, memory: str, *, seed: int = 5, **kw) -> tuple[float, dict[str, Optional[torch.Tensor]], float]:
    """Loss, the gradients of images / labels / syn_lr, and the next draw of torch's RNG after the backward
    (so the op must leave the caller's random stream where the loop leaves it). ``memory="loop"`` is the
    authors' loop from ``edfkern.baselines``."""
    x = case.images.clone().requires_grad_(True)
    y = case.labels.clone().requires_grad_(True) if case.labels.is_floating_point() else case.labels.clone()
    a = case.syn_lr.clone().requires_grad_(True)
    torch.manual_seed(seed)
    if memory == "loop":
        kw.pop("checkpoint_every", None)
        kw.pop("process_group", None)
        kw.setdefault("batch_syn", x.shape[0])
        if kw.get("batches") is not None:
            kw.setdefault("syn_steps", len(kw["batches"]))
        loss = baselines.trajectory_matching_loop(case.student, x, y, case.start, case.target, a, **kw)
    else:
        loss = edfkern.trajectory_matching_loss(case.student, x, y, case.start, case.target, a, memory=memory, **kw)
    loss.backward()
    after = float(torch.rand(()))
    return float(loss.detach()), {"images": x.grad, "labels": y.grad if y.requires_grad else None, "syn_lr": a.grad}, after


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_same_grads(got, want, tol: float = 1e-10, what: str = "") -> None:
    (lg, gg, ag), (lw, gw, aw) = got, want
    assert abs(lg - lw) <= tol * abs(lw), f"{what}: loss {lg!r} vs the loop's {lw!r}"
    for k, w in gw.items():
        if w is None:
            assert gg[k] is None, f"{what}: {k}.grad should be None"
            continue
        assert gg[k] is not None, f"{what}: {k}.grad is None"
        r = rel(gg[k], w)
        assert r <= tol, f"{what}: {k}.grad is {r:.3e} relative from the loop's (> {tol:g})"
    assert ag == aw, f"{what}: torch's RNG continues differently after the call ({ag} vs {aw})"


# ----------------------------------------------------------------------------- distributed cases


DIST_CASES = {
    # name: (make_case kwargs, op kwargs)
    "hard_dsa_drop": (dict(n=10), dict(syn_steps=4, batch_syn=7, augment=dsa_like, drop_ratio=0.375)),
    "soft_full_batch": (dict(n=9, soft=True), dict(syn_steps=3, drop_ratio=0.0)),
    "soft_dsa_checkpoint": (dict(n=10, soft=True), dict(syn_steps=5, batch_syn=4, augment=dsa_like,
                                                         drop_ratio=0.25, checkpoint_every=2)),
    "batch_smaller_than_world": (dict(n=6), dict(batches=[torch.tensor([4]), torch.tensor([1, 5]),
                                                          torch.tensor([0, 2, 3])])),
}


def _run_dist(rank: int, world: int, out: str) -> int:
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=float(os.environ.get("EDFKERN_DIST_TIMEOUT", "60")))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    pg = dist.group.WORLD
    results = {}
    for name, (ckw, okw) in DIST_CASES.items():
        try:
            c = make_case(**ckw)
            got = grads(c, "constant", process_group=pg, **okw)
            want = grads(c, "loop", **okw)
            assert_same_grads(got, want, what=f"{name} rank {rank}/{world}")
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (reported per case)
            results[name] = traceback.format_exc()
    # a rank with a different RNG state must raise on every rank, not hang or return another answer
    try:
        c = make_case(n=8)
        torch.manual_seed(100 + rank)
        x = c.images.clone().requires_grad_(True)
        try:
            edfkern.trajectory_matching_loss(c.student, x, c.labels, c.start, c.target, c.syn_lr, syn_steps=2,
                                             batch_syn=4, process_group=pg)
            results["rng_disagreement"] = "no error raised"
        except ValueError as e:
            results["rng_disagreement"] = "ok" if "RNG" in str(e) and "ranks [" in str(e) else f"wrong message: {e}"
    except Exception:  # noqa: BLE001
        results["rng_disagreement"] = traceback.format_exc()
    # BatchNorm in train mode: its batch statistics would change with the split, so every rank refuses
    try:
        bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                 torch.nn.LazyLinear(K)).double()
        bn(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))
        c = make_case(8)
        st = FlatStudent(bn)
        w0 = flat_params(bn)
        try:
            edfkern.trajectory_matching_loss(st, c.images, c.labels, w0, w0 + 1, c.syn_lr, syn_steps=2,
                                             process_group=pg)
            results["train_batchnorm"] = "no error raised"
        except ValueError as e:
            results["train_batchnorm"] = "ok" if "BatchNorm" in str(e) and "train" in str(e) else f"wrong: {e}"
    except Exception:  # noqa: BLE001
        results["train_batchnorm"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    from edfkern.distributed import exit_process, shutdown

    shutdown()
    exit_process(0)
    return 0


if __name__ == "__main__":
    _run_dist(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


# ----------------------------------------------------------------------------- memory (run in child processes)


def peak_rss_growth(arg: tuple[str, int]) -> int:
    """Peak resident bytes above the start of one call + backward (``memory`` in ``{"loop", "constant"}``,
    ``syn_steps``), in a fresh child (``edfkern.bench.memory.run_isolated``). A float32 ConvNet of width 16,
    depth 2, 16x16 images, 48 images per step: the loop's graph grows by megabytes per step."""
    from edfkern.bench import memory as M

    mode, steps = arg
    torch.set_num_threads(1)
    net = seeded_convnet(1, width=16, depth=2, size=16, channels=3, num_classes=K)
    student, start = FlatStudent(net), flat_params(net)
    g = torch.Generator().manual_seed(0)
    target = start + 0.01 * torch.randn(start.numel(), generator=g)
    x = torch.randn(48, 3, 16, 16, generator=g).requires_grad_(True)
    y = torch.arange(48) % K
    a = torch.tensor(0.01, requires_grad=True)

    def call(s: int) -> None:
        if mode == "loop":
            loss = baselines.trajectory_matching_loop(student, x, y, start, target, a, syn_steps=s, batch_syn=48)
        else:
            loss = edfkern.trajectory_matching_loss(student, x, y, start, target, a, syn_steps=s)
        loss.backward()
        x.grad = a.grad = None

    call(1)  # warm-up: libraries, allocator pools, the CPD op's first call
    M.trim_heap()
    if not M.reset_peak_rss():
        raise RuntimeError("this kernel refuses to reset VmHWM (/proc/self/clear_refs)")
    base = M.rss_bytes()
    call(steps)
    return M.peak_rss_bytes() - base
