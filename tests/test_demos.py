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


def test_integration_guide_snippets():
    """Every ```python block of INTEGRATION.md runs, in order, in one namespace (```python before
    blocks show the authors' loops and are skipped: they need torchcam)."""
    text = open(os.path.join(ROOT, "INTEGRATION.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```\s*$", text, flags=re.S | re.M)
    runnable = [code for info, code in blocks if info.strip() == "python"]
    skipped = [code for info, code in blocks if info.strip() == "python before"]
    assert len(runnable) >= 6 and len(skipped) >= 4
    namespace = {"__name__": "integration_guide"}
    for i, code in enumerate(runnable):
        try:
            exec(compile(code, f"INTEGRATION.md[python block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"INTEGRATION.md python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
