"""Whole-step profiles (``python -m edfkern.bench --step``): the loop and the edfkern versions of each
step compute the same update, and the command line refuses bad input with exit code 2.

Kept small: narrow ConvNets at IPC 2-3, so the float64 oracle runs in a second or two.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edfkern.bench.step_models import ConvNet, conv_costs
from edfkern.bench import steps as steps_mod
from edfkern.bench.cli import main
from edfkern.bench.steps import (STEP_VERSIONS, STEPS, Parts, StepParams, estimate_peak_bytes, input_bytes,
                                 largest_fit, make_step)

from tests._utils import assert_fp_rule

ROOT = Path(__file__).resolve().parents[1]
TINY = replace(StepParams(), width=16, real_per_class=8, batch_syn=8, syn_steps=2, cam_width=8, cam_batch=16)


def _one_iteration(step: str, version: str, dtype: torch.dtype, ipc: int = 3, params: StepParams = TINY):
    kw = {"given_noise": True} if step == "mtt-edf" else {}
    s = make_step(step, version, ipc, params, dtype=dtype, seed=5, **kw)
    x0 = s.image_syn.detach().clone()
    s.prepare(0)
    s.refresh(Parts("cpu"))
    s.iteration(Parts("cpu"))
    return s, s.image_syn.detach() - x0


@pytest.mark.parametrize("step", STEPS)
def test_loop_and_edfkern_steps_make_the_same_update(step):
    """One iteration from the same state: the edfkern update is within the package's float32 rule of the
    float64 loop oracle (at most 2x the plain float32 loop's error plus a few ulps)."""
    _, oracle = _one_iteration(step, "loop", torch.float64)
    loop32, plain = _one_iteration(step, "loop", torch.float32)
    fused, actual = _one_iteration(step, "edfkern", torch.float32)
    assert oracle.abs().max() > 0, "the step did not move the images"
    assert_fp_rule(actual, oracle, plain, name=f"{step} image update")
    assert loop32.loss == pytest.approx(fused.loss, rel=1e-5)
    if step == "dm-iid":  # the edfkern version with the loop's per-class forward: the same update too
        per_class = replace(TINY, dm_batched_forward=False)
        assert_fp_rule(_one_iteration(step, "edfkern", torch.float32, params=per_class)[1], oracle, plain,
                       name="dm-iid image update, per-class forward")
    if step == "mtt-edf":  # the CAMs the masks were built from (test_cam.py's float32 bar)
        assert (fused.cams - loop32.cams).abs().max() < 1e-4
        assert fused.syn_lr.item() == pytest.approx(loop32.syn_lr.item(), rel=1e-6)


def test_constant_version_makes_the_unrolled_update():
    """mtt-edf ``constant`` (edfkern.trajectory_matching_loss on the same batches) moves the images and the lr as
    the unrolled student does: float64 against the float64 edfkern version (same DAE optimizer) to 1e-10
    relative, float32 within the package's rule of the float64 loop oracle; its parts add up."""
    T = replace(TINY, width=8, cam_width=4, cam_batch=8, batch_syn=4, syn_steps=3)
    ed64, ed_up = _one_iteration("mtt-edf", "edfkern", torch.float64, ipc=2, params=T)
    c64, c_up = _one_iteration("mtt-edf", "constant", torch.float64, ipc=2, params=T)
    assert (c_up - ed_up).abs().max() <= 1e-10 * ed_up.abs().max()
    assert c64.syn_lr.item() == pytest.approx(ed64.syn_lr.item(), rel=1e-12)
    assert c64.loss == pytest.approx(ed64.loss, rel=1e-12)
    _, oracle = _one_iteration("mtt-edf", "loop", torch.float64, ipc=2, params=T)
    _, plain = _one_iteration("mtt-edf", "loop", torch.float32, ipc=2, params=T)
    _, actual = _one_iteration("mtt-edf", "constant", torch.float32, ipc=2, params=T)
    assert_fp_rule(actual, oracle, plain, name="mtt-edf constant image update")
    s = make_step("mtt-edf", "constant", 2, T, seed=5, given_noise=True)
    s.prepare(0)
    s.refresh(Parts("cpu"))
    t = Parts("cpu")
    s.iteration(t)
    assert set(t.s) <= set(s.PARTS) and t.s["reverse sweep: vjp (net double backward)"] > 0
    with pytest.raises(ValueError, match="version must be one of"):
        make_step("dm-iid", "constant", 2, TINY)


def test_syn_steps_sweep_runs_every_version_and_plots(tmp_path, monkeypatch):
    """--sweep syn_steps=1,3 at a fixed --ipc: every (syn_steps, version) measured, the syn_steps recorded, the
    constant version's breakdown printed, the plot written. Children run in this process (tiny sizes)."""
    monkeypatch.setattr(steps_mod.memory, "run_isolated", lambda fn, task, timeout: fn(task))
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    try:
        import matplotlib  # noqa: F401
        plot = ["--plot", str(png)]
    except ImportError:
        plot = []
    rc = main(["--step", "mtt-edf", "--sweep", "syn_steps=1,3", "--ipc", "1", "--width", "8", "--batch-syn", "4",
               "--cam-width", "4", "--cam-batch", "8", "--repeat", "1", "--threads", "1", "--json", str(out), *plot])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["meta"]["sweep_axis"] == "syn_steps" and data["meta"]["sweep"] == [1, 3]
    res = data["results"]
    assert {(r["syn_steps"], r["version"]) for r in res if r["status"] == "ok"} == \
        {(k, v) for k in (1, 3) for v in STEP_VERSIONS["mtt-edf"]}
    assert all(r["ipc"] == 1 and r["x"] == r["syn_steps"] and r["peak_bytes"] > 0 for r in res)
    est = {(r["syn_steps"], r["version"]): r["estimate_bytes"] for r in res}
    # the estimate: the loop grows by a step's graph per step, the constant op by a parameter vector per step
    assert est[(3, "loop")] - est[(1, "loop")] > 4 * (est[(3, "constant")] - est[(1, "constant")]) > 0
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cam_noise_from_the_generator_is_the_same_in_both_versions():
    """Without given noise, the loop and CAMExtractor draw the same noise from their generators."""
    cams = []
    for version in ("loop", "edfkern"):
        s = make_step("mtt-edf", version, 2, TINY, seed=1)
        s.refresh(Parts("cpu"))
        cams.append(s.cams)
    assert (cams[0] - cams[1]).abs().max() < 1e-4


def test_cost_model_counts_the_convnet():
    net = ConvNet()
    assert sum(p.numel() for p in net.parameters()) == conv_costs().params == 320_010
    # estimates grow with IPC and never undercut the inputs
    for step in STEPS:
        for v in STEP_VERSIONS[step]:
            a, b = estimate_peak_bytes(step, v, 10, StepParams()), estimate_peak_bytes(step, v, 100, StepParams())
            assert input_bytes(step, 10, StepParams()) < a < b


def test_largest_fit_says_when_it_extrapolates():
    mb = 2 ** 20
    rows = [dict(ipc=10, peak_bytes=100 * mb, status="ok"), dict(ipc=50, peak_bytes=500 * mb, status="skipped"),
            dict(ipc=100, status="skipped")]
    ipc, why = largest_fit(rows, 1000 * mb)
    assert ipc == 50 and "extrapolated" in why and "about IPC 100" in why
    ipc, why = largest_fit(rows, 300 * mb)
    assert ipc == 10 and "interpolated" in why
    assert largest_fit(rows, 50 * mb)[0] is None


@pytest.mark.parametrize("argv, needle", [
    (["--step", "dm-idd"], "argument --step"),
    (["--step", "dm-iid", "--sweep", "n=10"], "argument --sweep"),
    (["--step", "dm-iid", "--sweep", "ipc=10,0"], "argument --sweep"),
    (["--step", "dm-iid", "--sweep", "ipc=-5"], "argument --sweep"),
    (["--step", "dm-iid", "--sweep", "ipc=ten"], "argument --sweep"),
    (["--step", "mtt-edf", "--budget-mb", "1"], "argument --budget-mb"),
    (["--step", "dm-iid", "--sweep", "ipc=100", "--budget-mb", "50"], "argument --budget-mb"),
    (["--step", "dm-iid", "--repeat", "0"], "argument --repeat"),
    (["--step", "dm-iid", "--sweep", "syn_steps=10,20"], "argument --sweep"),
    (["--step", "mtt-edf", "--sweep", "syn_steps=10,0"], "argument --sweep"),
    (["--step", "mtt-edf", "--sweep", "steps=10"], "argument --sweep"),
    (["--step", "mtt-edf", "--sweep", "syn_steps=10,20", "--syn-steps", "5"], "argument --syn-steps"),
    (["--step", "mtt-edf", "--sweep", "ipc=1,2", "--ipc", "5"], "argument --ipc"),
    (["--step", "mtt-edf", "--sweep", "syn_steps=10", "--ipc", "0"], "argument --ipc"),
    (["--step", "dm-iid", "--versions", "constant"], "argument --versions"),
])
def test_cli_refuses_bad_input(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def _run(args, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "edfkern.bench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_routes_step_and_refuses_unknown_step(tmp_path):
    proc = _run(["--step", "nope"], tmp_path)
    assert proc.returncode == 2 and "argument --step" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_tiny_sweep_writes_json_and_skips_over_budget(tmp_path):
    """A tiny end-to-end sweep in child processes: every point measured or skipped with a reason."""
    out = tmp_path / "s.json"
    proc = _run(["--step", "dm-iid", "--sweep", "ipc=1,2,4000", "--width", "8", "--real-per-class", "4",
                 "--repeat", "2", "--threads", "1", "--budget-mb", "200", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skip dm-iid IPC 4000 loop: estimated peak" in proc.stdout
    assert "largest IPC within --budget-mb 200" in proc.stdout
    res = json.loads(out.read_text())["results"]
    ok = [r for r in res if r["status"] == "ok"]
    assert {(r["ipc"], r["version"]) for r in ok} == {(1, "loop"), (1, "edfkern"), (2, "loop"), (2, "edfkern")}
    for r in ok:
        assert len(r["iteration_s"]) == 2 and r["time_s"] > 0 and r["peak_bytes"] > 0
        assert r["memory"]["method"] in ("vmhwm", "vmrss-sampling", "cuda-max-allocated")
        assert abs(sum(r["share"].values()) - 1) < 1e-9
    assert all(r["status"] == "skipped" and "--budget-mb" in r["reason"] for r in res if r["ipc"] == 4000)
