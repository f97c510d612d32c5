"""Issue 20, class 1: distributed calls carry no identity (trust at the edges).

The cases live in ``tests/_dist_cases.py`` (``EDGE_CASES``) and run in gloo worlds of 2 and 3 spawned
processes with a 10 s collective timeout and a wall-clock deadline (``tests/_dist_launch.py``), one world
per size for all cases: ranks calling different ops, a local error on one rank followed by more calls,
checks that can fail on one rank only, scalar mismatches, ranks out of step. Before the header carried
the op, a call counter and the local checks' outcome, these crashed the world (gloo SIGABRT), waited for
the collective timeout, or returned silently wrong values. ``EDFKERN_DIST_TIMEOUT`` is checked in one
plain subprocess.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from tests._dist_cases import EDGE_CASES
from tests._dist_launch import ROOT, free_port, run_world


@functools.lru_cache(maxsize=None)
def _world(world_size: int) -> dict[str, list[str]]:
    # reference kernels: the protocol does not depend on the backend, and no rank waits for a native build
    return run_world(world_size, deadline_s=150.0, collective_timeout_s=10.0, suite="edges",
                     env={"EDFKERN_NO_NATIVE": "1"})


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_edge(world_size: int, case: str) -> None:
    results = _world(world_size)[case]
    assert len(results) == world_size
    failed = [(r, res) for r, res in enumerate(results) if res != "ok"]
    if failed:
        r, res = failed[0]
        pytest.fail(f"{case} failed on rank {r} of {world_size}:\n{res}", pytrace=False)


_TIMEOUT_SCRIPT = r"""
import datetime, os, sys, torch, torch.distributed as dist
import edfkern.distributed as ED            # EDFKERN_DIST_TIMEOUT=abc here: the import must not fail
from edfkern.distributed import _comm
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=30))
for value in ["abc", "-5", "0", "nan", "inf", "1e400", "-0.0", "1e9", "abc", "2", "", "0.5"]:
    os.environ["EDFKERN_DIST_TIMEOUT"] = value
    try:
        ED.all_reduce_sum_([torch.ones(1)], group=dist.group.WORLD)
        x = torch.ones(3, 2, 2)
        ED.local_covariance(x, groups=1, process_group=dist.group.WORLD)
        print(repr(value), "ok", _comm.collective_timeout().total_seconds())
    except Exception as e:
        print(repr(value), type(e).__name__, str(e).replace("\n", " "))
ED.shutdown()
ED.exit_process(0)
"""


def test_dist_timeout_env_is_validated_when_used() -> None:
    """``abc`` gave a traceback at import, ``-5`` failed every collective at once, ``0`` waited forever:
    now each bad value is a ValueError naming the variable at the first collective, and good ones work."""
    env = dict(os.environ, PYTHONPATH=ROOT, EDFKERN_NO_NATIVE="1", OMP_NUM_THREADS="1", EDFKERN_DIST_TIMEOUT="abc")
    p = subprocess.run([sys.executable, "-c", _TIMEOUT_SCRIPT, str(free_port())], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    for bad in ("abc", "-5", "0", "nan", "inf", "1e400", "-0.0", "1e9"):
        got = lines[repr(bad)]
        assert got.startswith("ValueError EDFKERN_DIST_TIMEOUT must be a positive, finite number of seconds"), \
            (bad, got)
        assert repr(bad) in got, (bad, got)
    assert lines["'2'"] == "ok 2.0" and lines["'0.5'"] == "ok 0.5", p.stdout
    assert lines["''"] == "ok 300.0", p.stdout  # empty: the default
