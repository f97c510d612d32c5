"""tools.gpucheck (developer tooling, run from the repository): the GPU validation script's CPU
dry run, the sm_90 spec capture and the resource-report parsers.

The dry run is the same script the lent GPU runs, with every CUDA step skipped and tiny
sizes elsewhere; running it here keeps it from rotting. Subprocesses run without
TRITON_INTERPRET (capture needs compiled-mode kernels) and with a wall-clock bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tools.gpucheck import sm90, validate

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               EDFKERN_NO_NATIVE="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_budgets_fit_nine_minutes():
    assert validate.TOTAL_BUDGET_S == sum(b for _, b, _ in validate.STEPS) < 540
    assert [s for s, _, _ in validate.STEPS] == list(validate.STEP_FUNCS)


def test_dry_run(tmp_path):
    """The whole script on CPU: CUDA steps print 'skipped: no CUDA', the others run and pass."""
    proc = subprocess.run([sys.executable, "-m", "tools.gpucheck", "validate", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((tmp_path / "validate.json").read_text())
    steps = summary["steps"]
    assert list(steps) == [s for s, _, _ in validate.STEPS]
    for name in ("build", "memcheck", "racecheck"):
        assert steps[name]["skipped"] == validate.SKIP_NO_CUDA
    assert steps["tests"]["collected"] > 0
    assert steps["ceilings"]["copy_Bps"] > 0 and steps["ceilings"]["matmul_fp32_flops"] > 0
    assert steps["cam"]["extractor_s"] > 0 and steps["cam"]["loop_s"] > 0
    for cfg in validate.BENCH_CONFIGS:
        data = json.loads((tmp_path / f"bench-{cfg}.json").read_text())
        assert {r["provider"] for r in data["results"]} >= {"baseline", "reference"}
    log = (tmp_path / "validate.log").read_text()
    for name, _, _ in validate.STEPS:
        assert f"=== [{name}] start" in log and f"=== [{name}] end" in log


def test_per_class_cam_loop_matches_extractor():
    """The loop the CAM step times computes the extractor's maps (same noise draws)."""
    import torch

    from edfkern.cam import CAMExtractor

    torch.manual_seed(0)
    model = validate.resnet18(3).eval()
    images = torch.randn(6, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with CAMExtractor(model, model.layer4, method="smoothgradcam++", num_samples=2, std=0.0) as ext:
        fused = ext(images, labels)
    loop = validate.per_class_cam_loop(model, model.layer4, images, labels, num_samples=2, std=0.0)
    assert fused.shape == loop.shape == (6, 2, 2)
    assert loop.abs().sum() > 0
    torch.testing.assert_close(loop, fused.to(loop.dtype), rtol=1e-4, atol=1e-5)


def test_capture_records_launcher_choices(tmp_path):
    """At cifar10-ipc1000 the CM backward is captured with the spill-free launch (num_stages=1;
    fp64 on 8 warps), int and label groups, and every kernel family shows up; the launcher modules
    are as they were afterwards."""
    code = textwrap.dedent("""
        import json, torch
        from tools.gpucheck.capture import capture
        import edfkern.triton.covariance as cov
        kernel, sms = cov._cov_bwd_kernel, cov.device_sm_count
        found = capture(["cifar10-ipc1000"], dtypes=(torch.float32, torch.float64))
        assert cov._cov_bwd_kernel is kernel and cov.device_sm_count is sms  # the patches are undone
        out = [dict(s.to_json(), name=s.name) for s in found]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    specs = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {s["name"] for s in specs}
    assert {"covariance._cov_fwd_kernel", "covariance._cov_bwd_kernel", "features._seg_mean_kernel",
            "features._cc_fwd_kernel", "features._cc_bwd_kernel", "dae._dae_apply_kernel", "dae._dae_stats_kernel",
            "gradcam._grad_cam_kernel", "cpd._cpd_hist_kernel", "cpd._cpd_backward_kernel"} <= names
    bwd = [s for s in specs if s["name"] == "covariance._cov_bwd_kernel"]
    assert bwd and all(s["num_stages"] == 1 for s in bwd)
    for s in bwd:
        cx = dict(s["constexprs"])
        sig = dict(s["signature"])
        fp64 = cx["ACC"] == "tl.fp64"
        assert s["num_warps"] == (8 if fp64 else 4)
        assert sig["SPLIT"] == "i32"  # a run-time argument: one compile serves every split
        assert sig["x_ptr"] == ("*fp64" if fp64 else "*fp32") and sig["perm_ptr"] == "*i64"
    assert {dict(s["constexprs"])["HAS_PERM"] for s in bwd} == {False, True}  # int and label groups


def test_parse_ptxas_and_cuobjdump():
    log = textwrap.dedent("""
        ptxas info    : Compiling entry function '_cov_bwd_kernel' for 'sm_90a'
        ptxas info    : Function properties for _cov_bwd_kernel
            568 bytes stack frame, 620 bytes spill stores, 672 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 41216 bytes smem, 448 bytes cmem[0]
    """)
    r = sm90.parse_ptxas(log)["_cov_bwd_kernel"]
    assert r == {"regs": 255, "spill_stores": 620, "spill_loads": 672, "stack": 568, "smem": 41216}
    dump = textwrap.dedent("""
        Resource usage:
         Common:
          GLOBAL:0
         Function _ZN7edfkern4cuda10sq_kernelIfEEvPKT_:
          REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
    """)
    assert sm90.parse_resource_usage(dump) == {"_ZN7edfkern4cuda10sq_kernelIfEEvPKT_":
                                               {"REG": 32, "STACK": 0, "SHARED": 1024, "LOCAL": 0}}
