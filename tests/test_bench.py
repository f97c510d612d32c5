"""Smoke test of the benchmark CLI (python -m edfkern.bench) on a tiny config.

Checks that the table and the JSON come out with every column, that speedups and
workspace are filled in, and that an IPC sweep writes a plot (skipped only without
matplotlib). Kept small: a few seconds on a 2-core CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="200")
    env.pop("TRITON_INTERPRET", None)  # the CLI leaves triton out of CPU timing either way
    proc = subprocess.run([sys.executable, "-m", "edfkern.bench", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_cli_table_and_json(tmp_path):
    out_json = tmp_path / "bench.json"
    out = _run(["--config", "cifar10-ipc1000", "--scale", "0.005", "--device", "cpu", "--quick", "--repeat", "3", "--threads", "1",
                "--ops", "class_centralization_loss,dae_", "--providers", "baseline,reference",
                "--json", str(out_json)], tmp_path)
    for col in ("provider", "median", "p20", "p80", "speedup", "workspace", "achieved", "of ceiling"):
        assert col in out, f"column {col!r} missing from the table:\n{out}"
    assert "class_centralization_loss @ cifar10-ipc1000" in out and "dae_ @ cifar10-ipc1000" in out
    assert "ceilings: copy" in out

    data = json.loads(out_json.read_text())
    meta, results = data["meta"], data["results"]
    assert meta["ceilings"]["copy_Bps"] > 0 and meta["ceilings"]["matmul_flops"] > 0
    assert meta["device"] == "cpu" and "baseline" in meta["providers"]
    ok = [r for r in results if r["status"] == "ok"]
    # default modes fwd,full: CC 2 modes x 2 providers; dae_ (fwd only) 1 x 2
    assert len(ok) == 6, [(r["op"], r["provider"], r["mode"], r["status"], r.get("reason")) for r in results]
    for r in ok:
        assert r["n"] == 3 and r["q20"] <= r["median"] <= r["q80"]
        assert r["speedup"] is not None and r["speedup"] > 0
        assert r["memory"]["method"] in ("vmhwm", "vmrss-sampling", "cuda-max-allocated")
        assert r["memory"]["workspace"] >= 0 and r["of_ceiling"] > 0
        assert r["ipc"] == 5 and r["N"] == 50  # 1000 * 0.005 images per class, 10 classes
    base = {(r["op"], r["mode"]): r["median"] for r in ok if r["provider"] == "baseline"}
    for r in ok:  # speedup is the baseline's median over this row's median, op by op and mode by mode
        assert r["speedup"] == pytest.approx(base[(r["op"], r["mode"])] / r["median"], rel=1e-9)


def test_quantiles_are_median_and_20_80_percentiles():
    from edfkern.bench.runner import quantiles

    assert quantiles([float(v) for v in range(11, 0, -1)]) == (6, 3, 9)


def test_workspace_accounting_separates_temporaries_from_outputs():
    """A 64 MiB temporary is workspace; a returned 64 MiB tensor is held output, not workspace."""
    import torch

    from edfkern.bench.memory import measure_call

    mib64 = 64 << 20

    def temporary():
        t = torch.ones(mib64 // 4)
        return float(t[-1])

    def returned():
        return torch.ones(mib64 // 4)

    held = lambda out: out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0  # noqa: E731
    tmp, _ = measure_call(temporary, held, device="cpu")
    ret, _ = measure_call(returned, held, device="cpu")
    assert 0.9 * mib64 <= tmp.workspace <= 1.3 * mib64
    assert ret.held == mib64 and ret.workspace <= 0.2 * mib64


def test_cli_sweep_skips_missing_op_and_plots(tmp_path):
    """cifar100-ipc50 has no CPD expert: the op is skipped with the reason; the rest is swept and plotted."""
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    png = tmp_path / "sweep.png"
    args = ["--config", "cifar100-ipc50", "--sweep", "ipc=2,4", "--device", "cpu", "--quick", "--repeat", "3", "--threads", "1",
            "--ops", "cpd_trajectory_loss,class_centralization_loss", "--providers", "baseline,reference",
            "--no-isolate"]
    out = _run(args + (["--plot", str(png)] if has_mpl else []), tmp_path)
    assert "skipped op cpd_trajectory_loss at cifar100-ipc50: config has no CPD expert" in out
    assert "class_centralization_loss @ cifar100-ipc50" in out and "IPC" in out
    if not has_mpl:
        pytest.skip("matplotlib is not installed: sweep ran, plot not checked")
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    """--plot with matplotlib missing stops before any work with a message saying what to install."""
    from edfkern.bench import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as e:
        cli.main(["--sweep", "ipc=2,4", "--plot", "x.png", "--device", "cpu"])
    assert "matplotlib" in str(e.value) and "pip install" in str(e.value)


def test_cases_cover_every_op_and_mode():
    """The setup factory builds every op x mode of a tiny config, with a cost model and a working reset."""
    from edfkern.bench.cases import OPS, Unavailable, make_case, op_modes

    for op in OPS:
        for mode in op_modes(op):
            for config in ("cifar10-ipc1000", "imagenette-ipc50"):
                try:
                    case = make_case(op, "reference", mode, config, scale=1e-9)
                except Unavailable as e:
                    assert "config has no" in str(e)
                    continue
                case.reset()
                case.fn()
                assert case.bytes_moved > 0 and case.flops > 0, case.name


def test_markdown_renders_the_committed_run_and_runs_without_a_baseline(tmp_path):
    """RESULTS.md's tables come from this renderer: it must reproduce the committed run's rows."""
    from edfkern.bench import markdown

    src = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-cifar10-ipc1000-latest.json"
    data = json.loads(src.read_text())
    text = markdown.render(data)
    cm = [r for r in data["results"] if r["op"] == "covariance_matching_loss" and r["mode"] == "full"
          and r["provider"] == "native"][0]
    assert f"{cm['speedup']:.2f}x" in text
    for r in data["results"]:  # a run without the baseline provider has no speedups
        r["speedup"] = None
    assert "| - |" in markdown.render(data)
