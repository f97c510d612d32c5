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
    for col in ("provider", "median", "p20", "p80", "speedup", "vs compiled", "workspace", "achieved", "of ceiling"):
        assert col in out, f"column {col!r} missing from the table:\n{out}"
    assert "class_centralization_loss @ cifar10-ipc1000" in out and "dae_ @ cifar10-ipc1000" in out
    assert "ceilings at start: copy" in out and "ceilings at end: copy" in out and "ceilings used" in out

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
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["--sweep", "ipc=2,4", "--plot", "x.png", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --plot" in err and "matplotlib" in err and "pip install" in err, err


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

    src = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-cifar10-ipc1000-all-ops-20261121T1712.json"
    data = json.loads(src.read_text())
    text = markdown.render(data)
    cm = [r for r in data["results"] if r["op"] == "covariance_matching_loss" and r["mode"] == "full"
          and r["provider"] == "native"][0]
    assert f"{cm['speedup']:.2f}x" in text
    for r in data["results"]:  # a run without the baseline provider has no speedups
        r["speedup"] = None
    assert "| - |" in markdown.render(data)


# ----------------------------------------------------------------------------- compiled provider


def _fake_compile_error(*a, **k):
    raise RuntimeError("no working C++ compiler found\nsecond line of a long inductor traceback")


def test_compiled_provider_skipped_with_one_line_reason_when_torch_compile_fails(monkeypatch, capsys):
    """torch.compile raising (no C++ compiler, inductor error): the provider is skipped, one line, no crash."""
    import torch

    from edfkern.bench import cli
    from edfkern.bench import compiled as C

    monkeypatch.setattr(torch, "compile", _fake_compile_error)
    monkeypatch.setattr(C, "_PROBE", {})
    monkeypatch.setattr(C, "_COMPILED", {})
    rc = cli.main(["--config", "cifar10-ipc1000", "--scale", "0.002", "--device", "cpu", "--quick", "--repeat", "3",
                   "--threads", "1", "--ops", "class_centralization_loss", "--providers", "baseline,compiled",
                   "--modes", "fwd", "--no-isolate", "--no-memory"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if "skipped provider compiled" in ln]
    assert len(lines) == 1 and "no working C++ compiler found" in lines[0], out
    assert "second line" not in out
    assert "class_centralization_loss @ cifar10-ipc1000" in out and "providers: baseline;" in out
    assert not any("compiled" in ln and "fwd" in ln for ln in out.splitlines()), out  # no compiled row


def test_compiled_case_failing_to_compile_is_unavailable_with_one_line(monkeypatch):
    """The probe passed but one op's compile fails: that case is skipped (Unavailable), one line."""
    from edfkern.bench import compiled as C
    from edfkern.bench.cases import Unavailable, make_case
    from edfkern.bench.runner import run_task

    monkeypatch.setattr(C, "compiled", lambda op: _fake_compile_error)
    with pytest.raises(Unavailable) as e:
        make_case("class_centralization_loss", "compiled", "full", "cifar10-ipc1000", scale=1e-9)
    assert str(e.value) == "torch.compile failed: RuntimeError: no working C++ compiler found"
    res = run_task(dict(op="class_centralization_loss", provider="compiled", mode="fwd", config="cifar10-ipc1000",
                        scale=1e-9, device="cpu", memory=False, repeat=3))
    assert res["status"] == "skipped" and "\n" not in res["reason"]


def test_default_provider_asks_dispatch_per_op(monkeypatch):
    """The bench's * is edfkern._dispatch.auto_backend of each op's kernel, so a per-op order is honoured."""
    import edfkern.reference
    from edfkern import _dispatch
    from edfkern.bench.cases import KERNEL_OF, OPS, default_provider

    assert set(KERNEL_OF) == set(OPS)
    for op in OPS:
        assert hasattr(edfkern.reference, KERNEL_OF[op]), f"{op}: no kernel {KERNEL_OF[op]!r}"
        assert default_provider(op, "cpu") == _dispatch.auto_backend(KERNEL_OF[op], "cpu")
    calls = []
    real = _dispatch.auto_backend

    def spy(kernel_name, device):
        calls.append(kernel_name)
        return "reference" if kernel_name == "cc_forward" else real(kernel_name, device)

    monkeypatch.setattr("edfkern.bench.cases.auto_backend", spy)
    assert default_provider("class_centralization_loss", "cpu") == "reference"
    assert calls == ["cc_forward"]


def test_vs_compiled_and_per_op_star():
    from edfkern.bench.report import _rows, add_derived

    def r(op, prov, med):
        return dict(op=op, provider=prov, mode="fwd", config="c", ipc=1, effective_scale=1.0, status="ok",
                    median=med, q20=med, q80=med)

    rs = [r("a", "baseline", 8.0), r("a", "native", 1.0), r("a", "compiled", 2.0), r("b", "native", 1.0)]
    add_derived(rs, None)
    assert [x["vs_compiled"] for x in rs] == [0.25, 2.0, 1.0, None]
    cols, rows, _ = _rows(rs[:3], "native", sweep=False)
    i = cols.index("vs compiled")
    assert [row[i] for row in rows] == ["0.25x", "2.00x", "1.00x"]
    assert [row[1] for row in rows] == ["baseline", "native*", "compiled"]


# ----------------------------------------------------------------------------- ceilings: the 100% rule


def _ceil(copy=10e9, mm=100e9):
    from edfkern.bench.ceilings import Ceilings

    return Ceilings(copy_Bps=copy, matmul_flops=mm, copy_bytes=256 << 20, matmul_n=2048)


def _res(op, achieved_Bps, bytes_moved=10 ** 9):
    return dict(op=op, provider="native", mode="fwd", config="c", ipc=1, effective_scale=1.0, status="ok",
                bytes_moved=bytes_moved, flops=1, median=bytes_moved / achieved_Bps, q20=1.0, q80=1.0)


def test_settle_no_remeasure_when_within():
    from edfkern.bench.ceilings import settle

    rs = [_res("a", 5e9)]
    called = []
    ceil, notes = settle(rs, _ceil(), lambda sizes: called.append(sizes) or _ceil())
    assert notes == [] and called == [] and rs[0]["of_ceiling"] == pytest.approx(0.5)


def test_settle_remeasures_when_a_rate_beats_the_ceiling():
    from edfkern.bench.ceilings import settle

    rs = [_res("a", 12e9), _res("b", 5e9)]
    called = []

    def remeasure(sizes):
        called.append(sizes)
        return _ceil(copy=15e9)

    ceil, notes = settle(rs, _ceil(), remeasure)
    assert called == [[10 ** 9]] and ceil.copy_Bps == 15e9
    assert "ceiling measurement disturbed" in notes[0] and "a native fwd 120%" in notes[0]
    assert rs[0]["of_ceiling"] == pytest.approx(0.8) and rs[0]["ceiling_source"] == "measured"


def test_settle_uses_the_achieved_rate_when_still_above_and_nothing_prints_above_100(capsys):
    from edfkern.bench.ceilings import settle
    from edfkern.bench.report import print_tables

    rs = [_res("a", 30e9), _res("b", 5e9)]
    called = []
    ceil, notes = settle(rs, _ceil(), lambda sizes: called.append(sizes) or _ceil(copy=11e9), tries=3)
    assert len(called) == 3 and ceil.copy_Bps == 11e9
    assert rs[0]["of_ceiling"] == 1.0 and rs[0]["ceiling_source"] == "achieved" and rs[0]["ceiling"] == 30e9
    assert rs[1]["of_ceiling"] == pytest.approx(5 / 11)
    assert len(notes) == 2 and "used as the ceiling estimate" in notes[1] and "\n" not in "".join(notes)
    print_tables(rs, default_provider=None, ceilings=ceil)
    out = capsys.readouterr().out
    import re

    pcts = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)%", out)]
    assert pcts and max(pcts) <= 100.0, out
    assert "100.0% est" in out


def test_ceiling_at_an_ops_own_size_counts_when_better():
    from edfkern.bench.ceilings import apply

    c = _ceil(copy=10e9)
    c.at_size[10 ** 9] = 20e9
    rs = [_res("a", 15e9), _res("b", 15e9, bytes_moved=2 * 10 ** 9)]
    over = apply(rs, c)
    assert [r["op"] for r in over] == ["b"] and rs[0]["of_ceiling"] == pytest.approx(0.75)
    assert c.best(_ceil(copy=12e9)).copy_Bps == 12e9 and c.best(_ceil(copy=12e9)).at_size == {10 ** 9: 20e9}


def test_load_note_says_what_the_load_implies():
    from edfkern.bench.cli import load_note

    assert "no other process" in load_note(0.1, 2)
    s = load_note(1.4, 2)
    assert "load average at start 1.40 on 2 CPUs" in s and "~1.4 CPU" in s and "inflated" in s
    assert "~0.7 CPU" in load_note(1.7, 2, own=1.0, when="at end")
    assert "more than the 2 CPUs there are" in load_note(6.0, 2)
    assert "on top of this run's" in load_note(6.75, 2, own=2.0, when="at end")
