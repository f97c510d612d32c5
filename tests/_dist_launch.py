"""Start a gloo world of spawned processes for the distributed tests, with a wall-clock bound.

Spawning is the expensive part on a small machine (every process imports torch), so one world runs
*every* case (see ``tests/_dist_cases.py``) and reports per case; pytest then asserts per case.
Like PyTorch's ``MultiProcessTestCase``: a fresh free port per world, every rank a separate process,
rank 0's and everyone's failures reported with their traceback, and a hard deadline after which the
whole world is killed so a hang fails the test instead of CI.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world_size: int, *, deadline_s: float = 240.0, collective_timeout_s: float = 60.0,
              only: str = "", suite: str = "cases", env: dict[str, str] | None = None,
              script: str = "_dist_cases.py") -> dict[str, list[str]]:
    """Run every case of ``suite`` (``"cases"``: ``CASES``, ``"edges"``: ``EDGE_CASES`` of
    ``tests/_dist_cases.py``; another ``script`` of ``tests/`` takes the same arguments
    ``RANK WORLD OUTDIR FILTER SUITE`` and writes ``OUTDIR/rank{RANK}.json``) on ``world_size`` ranks; ``{case: [result of rank 0, rank 1, ...]}`` where a
    result is ``"ok"``, ``"skip: why"`` or a traceback. ``env`` adds variables. Raises ``AssertionError``
    when a rank crashes or the world runs past ``deadline_s``."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=ROOT,
               EDFKERN_DIST_TIMEOUT=str(collective_timeout_s), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               **(env or {}))
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for r in range(world_size):
            cmd = [sys.executable, os.path.join(HERE, script), str(r), str(world_size), out, only, suite]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        t_end = time.monotonic() + deadline_s
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=max(t_end - time.monotonic(), 1.0))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            tails = [(p.communicate()[0] or "")[-3000:] for p in procs]
            raise AssertionError(f"world of {world_size} ran past {deadline_s} s; output tails:\n" + "\n---\n".join(tails))
        if os.environ.get("EDFKERN_DIST_TEST_TIMES"):
            print(logs[0])
        results: dict[str, list[str]] = {}
        for r, (p, log) in enumerate(zip(procs, logs)):
            path = os.path.join(out, f"rank{r}.json")
            if p.returncode != 0 or not os.path.exists(path):
                raise AssertionError(f"rank {r} of {world_size} exited with {p.returncode}:\n{log[-5000:]}")
            with open(path) as f:
                for case, res in json.load(f).items():
                    results.setdefault(case, []).append(res)
        return results
