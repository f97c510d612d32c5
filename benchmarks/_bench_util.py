"""Helpers shared by the benchmark files (kept out of conftest.py so ``tests/conftest.py`` cannot shadow them)."""
from __future__ import annotations

import os
import time

import pytest
import torch

from edfkern.bench.cases import Unavailable, fit_scale, make_case, op_modes, providers
from edfkern.bench.configs import CONFIGS, get_config

DEVICE = os.environ.get("EDFKERN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
TRITON_CPU_REASON = ("triton on CPU runs under the TRITON_INTERPRET=1 interpreter: its times say nothing about "
                     "the kernels (set EDFKERN_BENCH_TRITON_CPU=1 to time it anyway)")

#: On CPU the default leaves out in1k-ipc50: its 1000-class Python loops (the baseline rows) take
#: about 10 s a call on 2 cores whatever the scale, more than all the other configs together.
#: EDFKERN_BENCH_CONFIGS=all brings it back.
CPU_DEFAULT_CONFIGS = [c for c in CONFIGS if c != "in1k-ipc50"]

#: set by conftest.pytest_configure from the options / environment
SETTINGS = {"scale": os.environ.get("EDFKERN_BENCH_SCALE") or "auto",
            "configs": CPU_DEFAULT_CONFIGS if DEVICE == "cpu" else list(CONFIGS)}


def provider_params():
    """baseline + every backend + ``compiled`` (torch.compile of :mod:`edfkern.bench.compiled`'s plain
    PyTorch formulas); the ones that cannot run here carry a skip mark with the (one-line) reason."""
    out = []
    for name, why in providers(DEVICE).items():
        if why is None and name == "triton" and DEVICE == "cpu" and os.environ.get("EDFKERN_BENCH_TRITON_CPU") != "1":
            why = TRITON_CPU_REASON
        marks = () if why is None else pytest.mark.skip(reason=f"{name}: {why}")
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def config_params():
    """Every docs/benchmarks.md config (conftest deselects the ones EDFKERN_BENCH_CONFIGS leaves out)."""
    return [pytest.param(c, id=c) for c in CONFIGS]


def scale_for(op: str, config: str) -> float:
    if SETTINGS["scale"] != "auto":
        return float(SETTINGS["scale"])
    if DEVICE != "cpu":
        return 1.0
    limit = float(os.environ.get("EDFKERN_BENCH_MAX_INPUT_MB", "16")) * 2 ** 20
    return fit_scale(op, get_config(config), limit)


def run_bench(benchmark, op: str, provider: str, mode: str, config: str) -> None:
    """Build the case from the shared factory and time it with pytest-benchmark."""
    scale = scale_for(op, config)
    try:
        case = make_case(op, provider, mode, config, device=DEVICE, scale=scale)
    except Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"{op} {mode} @ {config}"
    # a compiled case was compiled and warmed at this shape inside make_case: outside the timed rounds
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, config=config, scale=scale, N=case.config.N,
                                shapes=case.shapes, bytes_moved=case.bytes_moved, flops=case.flops,
                                compile_s=case.compile_s)
    case.reset()
    t0 = time.perf_counter()
    case.fn()  # first call: warm-up, and the estimate for the number of rounds
    dt = time.perf_counter() - t0
    rounds = int(os.environ.get("EDFKERN_BENCH_ROUNDS", "0")) or max(3, min(30, int(0.2 / max(dt, 1e-9))))

    def setup():  # pedantic() takes setup's return value as arguments: return None
        case.reset()

    benchmark.pedantic(case.fn, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    med = getattr(stats, "median", None)
    if med:
        benchmark.extra_info.update(GBps=case.bytes_moved / med / 1e9, GFLOPs=case.flops / med / 1e9)


def op_bench(op: str):
    """The pytest-benchmark test of ``op``: one case per provider x mode x config (assign it to a ``test_*`` name)."""
    @pytest.mark.parametrize("config", config_params())
    @pytest.mark.parametrize("mode", op_modes(op))
    @pytest.mark.parametrize("provider", provider_params())
    def test(benchmark, provider, mode, config):
        run_bench(benchmark, op, provider, mode, config)
    test.__doc__ = f"``{op}``, timed by :func:`run_bench`."
    return test
