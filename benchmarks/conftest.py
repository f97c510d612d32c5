"""pytest-benchmark suites for edfkern: ``pytest benchmarks/ --benchmark-only``.

Every case comes from the setup factory the CLI uses (:func:`edfkern.bench.cases.make_case`),
parametrized over provider x mode x config. Compare providers side by side with::

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:config
    pytest benchmarks/bench_covariance.py --benchmark-only --benchmark-group-by=func,param:mode,param:config

Providers are ``baseline`` (the loops of :mod:`edfkern.baselines`), every backend of
:func:`edfkern.backends`, and ``compiled``: ``torch.compile`` (inductor, default mode,
``dynamic=False``) of the plain vectorised PyTorch formulas in :mod:`edfkern.bench.compiled`,
compiled and warmed at each case's shape before the timed rounds (its ``extra_info`` holds
``compile_s``); one that cannot run here is skipped with the reason (for ``compiled``: why
torch.compile failed, e.g. no C++ compiler).
On CPU, ``triton`` runs only under the TRITON_INTERPRET=1 interpreter, whose times mean
nothing for the kernels, so it is skipped unless EDFKERN_BENCH_TRITON_CPU=1.

Size (environment variable or option):
    EDFKERN_BENCH_SCALE / --edfkern-scale: ``auto`` (default) shrinks IPC, real rows per
        class and CPD's P, per op and config, until the inputs fit EDFKERN_BENCH_MAX_INPUT_MB
        (default 16 on CPU, unlimited on CUDA); a number fixes the factor (1 = the config's full size).
    EDFKERN_BENCH_CONFIGS / --edfkern-configs: comma-separated config names, or ``all``
        (default: all on CUDA; on CPU all but in1k-ipc50, whose 1000-class loop baselines
        take ~10 s a call on 2 cores at any scale).
    EDFKERN_BENCH_ROUNDS: timed rounds per case (default: as many as fit 0.2 s, 3..30).
    EDFKERN_BENCH_DEVICE: cpu or cuda (default: cuda when available).

Files: ``bench_*.py`` (collected by the hook below; pyproject's default pattern is test_*.py).
"""
from __future__ import annotations

import os

import pytest

from _bench_util import SETTINGS
from edfkern.bench.configs import CONFIGS, get_config


def pytest_addoption(parser):
    g = parser.getgroup("edfkern benchmarks")
    g.addoption("--edfkern-scale", default=None, help="auto or a factor on IPC / real rows / P (env EDFKERN_BENCH_SCALE)")
    g.addoption("--edfkern-configs", default=None, help="comma-separated configs (env EDFKERN_BENCH_CONFIGS)")


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself; only add the ones found in a directory
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    scale = config.getoption("--edfkern-scale", default=None) or os.environ.get("EDFKERN_BENCH_SCALE") or "auto"
    if scale != "auto":
        float(scale)  # a bad value fails at once
    names = config.getoption("--edfkern-configs", default=None) or os.environ.get("EDFKERN_BENCH_CONFIGS")
    configs = [c.strip() for c in names.split(",") if c.strip()] if names else None
    if configs == ["all"]:
        configs = list(CONFIGS)
    for c in configs or ():
        get_config(c)  # unknown names fail at once
    SETTINGS["scale"] = scale
    if configs:
        SETTINGS["configs"] = configs


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        cfg = getattr(getattr(item, "callspec", None), "params", {}).get("config")
        (drop if cfg is not None and cfg not in SETTINGS["configs"] else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
