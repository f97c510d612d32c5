"""edfkern.distributed on CPU: gloo worlds of 1, 2, 3 and 4 spawned processes.

Each world size starts its processes once and runs every case of ``tests/_dist_cases.py`` in them
(spawning dominates the cost on a small machine); each case is then its own test here. Every
collective has a timeout (``EDFKERN_DIST_TIMEOUT``) and every world a wall-clock deadline, so a
bug fails the test instead of hanging CI.
"""
from __future__ import annotations

import functools

import pytest

from tests._dist_cases import CASES
from tests._dist_launch import run_world

WORLD_SIZES = [1, 2, 3, 4]


@functools.lru_cache(maxsize=None)
def _world(world_size: int) -> dict[str, list[str]]:
    return run_world(world_size, deadline_s=240.0, collective_timeout_s=60.0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_case(world_size: int, case: str) -> None:
    results = _world(world_size)[case]
    assert len(results) == world_size
    failed = [(r, res) for r, res in enumerate(results) if res != "ok" and not res.startswith("skip:")]
    if failed:
        r, res = failed[0]
        pytest.fail(f"{case} failed on rank {r} of {world_size}:\n{res}", pytrace=False)
    if all(res.startswith("skip:") for res in results):
        pytest.skip(results[0][len("skip: "):])
