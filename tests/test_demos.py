"""The end-to-end demos in python/, in --quick mode, as a CI test.

Each runs as a script in a subprocess (as a user would run it) on the real digits data set that
ships inside scikit-learn; nothing is downloaded. A run must exit 0, agree with the loop
baselines over its first iterations (the script checks that and prints ``RESULT: OK``) and
print its final table.
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(name: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", name), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]


def check_common(out: str, method: str) -> None:
    assert "RESULT: OK" in out, out
    rows = table_rows(out)
    assert rows[0][:2] == ["synthetic set", "test acc %"], out
    names = [r[0] for r in rows[1:]]
    assert names[0].startswith("random real init")
    assert names[1] == f"{method}, baseline loops"
    assert names[2].startswith(f"{method}, edfkern default backend")
    for r in rows[1:]:
        acc = float(r[1].split("+-")[0])
        assert 10.0 < acc <= 100.0, r  # well above chance (10 classes) on held-out digits
    for r in rows[2:]:
        assert all(float(v) > 0 for v in r[2:]), r  # timings
    m = re.search(r"max \|image_syn\(baseline\) - image_syn\(edfkern\)\| = (\S+)", out)
    assert m and float(m.group(1)) < 1.0, out


def test_demo_dm_iid_quick():
    check_common(run_demo("demo_dm_iid.py"), "DM+IID")


def test_demo_mtt_edf_quick():
    check_common(run_demo("demo_mtt_edf.py"), "MTT+EDF")


def run_torchrun(name: str, *extra: str, timeout: float = 420) -> str:
    """``torchrun --nproc-per-node 2 python/<name> --distributed --quick ...`` on a free port, bounded."""
    from tests._dist_launch import free_port

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", EDFKERN_DIST_TIMEOUT="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), os.path.join(ROOT, "python", name), "--distributed", "--quick", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def check_distributed(out: str) -> None:
    """RESULT OK, and rank 0's losses equal the single-process run's to float32 rounding."""
    assert out.count("RESULT: OK") == 1, out  # printed by rank 0 only
    pairs = re.findall(r"iteration (\d+): .*?single-process (\S+), distributed (\S+)", out)
    assert pairs and pairs[0][0] == "1", out
    one, dist_ = float(pairs[0][1]), float(pairs[0][2])
    assert abs(one - dist_) <= 1e-5 * abs(one), pairs[0]  # first iteration: same images, same loss
    m = re.search(r"after the first iteration \|\|difference\|\| / \|\|update\|\| = (\S+)", out)
    assert m and float(m.group(1)) < 1e-4, out


def test_demo_dm_iid_torchrun_row_sharded():
    out = run_torchrun("demo_dm_iid.py", "--layout", "rows")
    assert "layout rows" in out
    check_distributed(out)


def test_demo_dm_iid_torchrun_class_sharded():
    out = run_torchrun("demo_dm_iid.py", "--layout", "classes", "--iters", "6")
    assert "layout classes" in out
    check_distributed(out)


def test_demo_mtt_edf_torchrun_chunked_cpd():
    out = run_torchrun("demo_mtt_edf.py")
    assert re.search(r"CPD sends \d+ bytes in 7 collectives per call", out), out
    check_distributed(out)
