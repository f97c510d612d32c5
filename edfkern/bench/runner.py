"""Run one benchmark case: inputs, workspace (first call), then the timed repeats.

:func:`run_task` is what each child process executes (see :mod:`edfkern.bench.memory`);
it takes and returns plain dicts so that it pickles. :func:`time_case` is the timing
loop: ``reset()`` untimed, then the op, which synchronises the device itself.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Optional

import torch

from . import memory
from .cases import Case, Unavailable, _sync, make_case
from .configs import get_config

__all__ = ["time_case", "quantiles", "run_task"]


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile), linear interpolation."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return statistics.median(s), q[1], q[7]


def time_case(case: Case, *, repeat: Optional[int] = None, budget_s: float = 1.0, warmup: int = 1,
              min_repeat: int = 3, max_repeat: int = 50) -> list[float]:
    """Seconds per call. ``repeat=None``: as many calls as fit ``budget_s`` (within [min, max])."""
    sync = _sync(case.device)
    for _ in range(warmup):
        case.reset()
        case.fn()
    times: list[float] = []
    target = repeat if repeat is not None else max_repeat
    t_start = time.perf_counter()
    while len(times) < target:
        case.reset()
        sync()
        t0 = time.perf_counter()
        out = case.fn()
        t1 = time.perf_counter()
        del out  # freeing the result (and any autograd graph it holds) is not part of the op's time
        times.append(t1 - t0)
        if repeat is None and len(times) >= min_repeat and time.perf_counter() - t_start >= budget_s:
            break
    return times


def _task_config(task: dict):
    cfg = get_config(task["config"])
    if task.get("ipc") is not None:
        cfg = cfg.with_ipc(task["ipc"])
    return cfg.scaled(task.get("scale", 1.0))


def run_task(task: dict) -> dict[str, Any]:
    """Build, measure and time one case. ``task`` keys: op, provider, mode, config, ipc, scale,
    device, seed, repeat, budget_s, memory. Returns the task plus results (``status`` ok /
    skipped / error)."""
    res: dict[str, Any] = dict(task)
    device = task["device"]
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    cfg = _task_config(task)
    res.update(N=cfg.N, ipc=cfg.ipc, K=cfg.K, effective_scale=cfg.scale)
    try:
        # warm-up at the smallest size: loads kernels, starts thread pools, JIT-compiles (the compiled
        # provider also compiles this tiny shape; make_case compiles and warms the timed shape itself)
        tiny = make_case(task["op"], task["provider"], task["mode"], cfg.scaled(1e-9), device=device,
                         seed=task.get("seed", 0) + 1)
        for _ in range(2):
            tiny.reset()
            tiny.fn()
        del tiny
        memory.trim_heap()
        before = memory.usage_before(device)
        case = make_case(task["op"], task["provider"], task["mode"], cfg, device=device, seed=task.get("seed", 0))
    except Unavailable as e:
        res.update(status="skipped", reason=str(e))
        return res
    res.update(bytes_moved=case.bytes_moved, flops=case.flops, shapes=case.shapes, compile_s=case.compile_s)
    try:
        if task.get("memory", True):
            mem, out = memory.measure_call(case.fn, case.held_bytes, device=device, before_inputs=before,
                                           reset=case.reset)
            del out
            res["memory"] = mem.as_dict()
        times = time_case(case, repeat=task.get("repeat"), budget_s=task.get("budget_s", 1.0),
                          warmup=0 if task.get("memory", True) else 1)
    except Exception as e:  # a provider without this kernel, a bad shape: report it in the table
        res.update(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        return res
    finally:
        del case
        gc.collect()
    med, q20, q80 = quantiles(times)
    res.update(status="ok", times=times, median=med, q20=q20, q80=q80, n=len(times))
    return res
