"""The one prepared GPU validation run (``benchmarks/gpu/validate.sh``), and its CPU dry run.

Steps, in order, each with its own wall-clock budget (seconds, enforced: a step past its
budget is killed and reported; a failing step never stops the later ones). The budgets are
estimates for an H200 with 16 cores and add up to :data:`TOTAL_BUDGET_S` < 540 s (9 min):

    env         10   device, driver, torch, Triton, nvcc versions
    ceilings    20   device copy bandwidth, fp32 (IEEE) and tf32 matmul rates, measured once
    build      100   native extension for this device's arch only (TORCH_CUDA_ARCH_LIST from
                     the device capability, MAX_JOBS = cores)
    tests      110   the GPU-relevant test files on CUDA tensors, triton and native (-x off)
    memcheck    45   compute-sanitizer --tool memcheck over tools.gpucheck.driver
    racecheck   45   compute-sanitizer --tool racecheck over the same driver
    bench      140   python -m edfkern.bench at imagenette-ipc50, cifar100-ipc50,
                     cifar10-ipc1000, in1k-ipc50, every provider the bench lists (35 s each)
    cam         30   CAMExtractor vs the per-class loop, ResNet-18 shape, N=500, 128 px

Everything goes under ``--out`` (``$OUT`` on the lent machine): ``validate.json`` (every
step's status, times and parsed results), ``validate.log`` (all output) and one
``bench-<config>.json`` per config (the timings ``AUTO_CUDA`` is filled from, docs/gpu.md).

``--dry-run`` (CPU, CI): the same steps; each CUDA step prints one line
"skipped: no CUDA", the rest run at tiny sizes.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import REPO

BENCH_CONFIGS = ("imagenette-ipc50", "cifar100-ipc50", "cifar10-ipc1000", "in1k-ipc50")
#: Test files that exercise the kernels on the selected device (the rest test pure-Python parts).
TEST_FILES = ("tests/test_kernel_contract.py", "tests/test_special_values.py", "tests/test_dae.py",
              "tests/test_gradcam.py", "tests/test_cpd.py", "tests/test_covariance.py", "tests/test_features.py",
              "tests/test_cam.py", "tests/test_dispatch.py")
TEST_SELECT = "triton or native or gpu or cuda"

#: How much longer than its H200 budget a step may run in a ``--dry-run`` on CPU before it is killed.
DRY_RUN_BUDGET_FACTOR = 6

#: (step, budget in seconds on an H200, what it does). The order is the run order.
STEPS: tuple[tuple[str, int, str], ...] = (
    ("env", 10, "device, driver, torch, Triton, nvcc versions"),
    ("ceilings", 20, "copy bandwidth, fp32 and tf32 matmul"),
    ("build", 100, "native extension for this arch"),
    ("tests", 110, "test suite on CUDA tensors (triton, native)"),
    ("memcheck", 45, "compute-sanitizer memcheck over the driver"),
    ("racecheck", 45, "compute-sanitizer racecheck over the driver"),
    ("bench", 140, "python -m edfkern.bench at 4 configs"),
    ("cam", 30, "CAMExtractor vs per-class loop"),
)
TOTAL_BUDGET_S = sum(b for _, b, _ in STEPS)
assert TOTAL_BUDGET_S < 540, "the validation run must fit 9 minutes"
SKIP_NO_CUDA = "skipped: no CUDA"


@dataclass
class Ctx:
    out: str
    dry: bool
    log_fh: object
    results: dict = field(default_factory=dict)
    ext_dir: str = ""

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.log_fh.write(msg + "\n")
        self.log_fh.flush()

    def sh(self, cmd: list[str], timeout: float, env: Optional[dict] = None) -> tuple[int, str]:
        """Run ``cmd``, stream its output into the log, kill it at ``timeout``; (rc, output)."""
        self.log(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
        full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH")) if p)
        try:  # in the repository: tools.gpucheck and tests/ are found there
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full,
                                 start_new_session=True, cwd=REPO)
        except OSError as e:
            self.log(f"cannot start: {e}")
            return 127, str(e)
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(p.pid, 9)
                p.wait()
                self.log(f"killed: past its {timeout:.0f} s budget")
                return 124, "".join(lines)
            if sel.select(timeout=min(left, 1.0)):
                line = p.stdout.readline()
                if not line:
                    break
                lines.append(line)
                self.log_fh.write(line)
                self.log_fh.flush()
                sys.stdout.write(line)
        p.wait()
        return p.returncode, "".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _py() -> str:
    return sys.executable


# ----------------------------------------------------------------------------- steps


def step_env(ctx: Ctx, budget: float) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable: {e}"
    import edfkern

    info["edfkern"] = getattr(edfkern, "__version__", "?")
    nvcc = shutil.which("nvcc")
    if nvcc:
        rc, out = ctx.sh([nvcc, "--version"], budget / 3)
        info["nvcc"] = out.strip().splitlines()[-1] if out.strip() else f"rc {rc}"
    else:
        info["nvcc"] = "not found"
    if _cuda():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        if shutil.which("nvidia-smi"):
            rc, out = ctx.sh(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total",
                              "--format=csv,noheader"], budget / 3)
            info["nvidia_smi"] = out.strip()
    else:
        info["device"] = SKIP_NO_CUDA
    for k, v in info.items():
        ctx.log(f"  {k}: {v}")
    return {"ok": True, **info}


def step_ceilings(ctx: Ctx, budget: float) -> dict:
    """Device-to-device copy (bytes read + written) and square matmuls, medians of CUDA-event timings."""
    import torch

    cuda = _cuda()
    dev = "cuda" if cuda else "cpu"
    nbytes = (2 << 30) if cuda else (16 << 20)
    n = 8192 if cuda else 256
    reps = 10 if cuda else 3

    def timed(fn) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
        else:
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    res = {"ok": True, "device": dev, "copy_bytes": nbytes, "copy_Bps": 2 * nbytes / t_copy, "matmul_n": n}
    del src, dst
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, tf32 in (("fp32", False), ("tf32", True)):
            if not cuda and tf32:
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            res[f"matmul_{name}_flops"] = 2 * n ** 3 / timed(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    if cuda:
        ab, bb = a.bfloat16(), b.bfloat16()
        res["matmul_bf16_flops"] = 2 * n ** 3 / timed(lambda: ab @ bb)
    ctx.log(f"  copy {res['copy_Bps'] / 1e9:.1f} GB/s (read+write, {nbytes >> 20} MiB); "
            + ", ".join(f"{k[7:-6]} {v / 1e12:.1f} TFLOP/s" for k, v in res.items() if k.startswith("matmul_")
                        and k.endswith("_flops")))
    return res


def step_build(ctx: Ctx, budget: float) -> dict:
    import torch

    cores = os.cpu_count() or 1
    env = {"MAX_JOBS": str(cores), "TORCH_EXTENSIONS_DIR": ctx.ext_dir, "EDFKERN_MARCH_NATIVE": "1"}
    if _cuda():
        major, minor = torch.cuda.get_device_capability(0)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    cmd = [_py(), "-m", "edfkern.build", "--force"]
    if not _cuda():
        ctx.log(f"  {SKIP_NO_CUDA} (would run: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)})")
        return {"ok": True, "skipped": SKIP_NO_CUDA, "env": env}
    t = time.perf_counter()
    rc, out = ctx.sh(cmd, budget, env)
    return {"ok": rc == 0 and "CPU + CUDA" in out, "rc": rc, "env": env, "seconds": time.perf_counter() - t,
            "tail": out[-1500:]}


def _pytest_summary(out: str) -> str:
    for line in reversed(out.strip().splitlines()):
        if " passed" in line or " failed" in line or " error" in line or "no tests ran" in line:
            return line.strip("= ")
    return ""


def step_tests(ctx: Ctx, budget: float) -> dict:
    files = [f for f in TEST_FILES if (REPO / f).exists()]
    env = {"TORCH_EXTENSIONS_DIR": ctx.ext_dir}
    base = [_py(), "-m", "pytest", *files, "-q", "-rfE", "-p", "no:cacheprovider", "-k", TEST_SELECT]
    if not _cuda():
        # collection only: no backend is required to load (CI's EDFKERN_REQUIRE_BACKENDS would demand native)
        rc, out = ctx.sh(base + ["--collect-only"], budget, dict(env, TRITON_INTERPRET="1", EDFKERN_REQUIRE_BACKENDS=""))
        n = sum(1 for line in out.splitlines() if "::" in line)
        ctx.log(f"  {SKIP_NO_CUDA} (the selection collects {n} tests here)")
        return {"ok": rc == 0 and n > 0, "skipped": SKIP_NO_CUDA, "collected": n}
    try:
        import xdist  # noqa: F401  (pytest-xdist: Triton JIT compiles in parallel workers)

        base += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    base += ["--junitxml", os.path.join(ctx.out, "tests.xml")]
    rc, out = ctx.sh(base, budget, dict(env, EDFKERN_REQUIRE_BACKENDS="triton,native"))
    return {"ok": rc == 0, "rc": rc, "summary": _pytest_summary(out),
            "failed": [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))][:50]}


def _sanitize(ctx: Ctx, budget: float, tool: str) -> dict:
    drv = [_py(), "-m", "tools.gpucheck.driver", "--backend", "native"]
    if not _cuda():
        ctx.log(f"  {SKIP_NO_CUDA}")
        return {"ok": True, "skipped": SKIP_NO_CUDA}
    san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(san):
        return {"ok": False, "error": "compute-sanitizer not found"}
    # Only edfkern's own kernels are checked (torch's are not ours, and racecheck on them is slow).
    dtypes = "float32,float16,bfloat16,float64" if tool == "memcheck" else "float32,float64"
    cmd = [san, "--tool", tool, "--error-exitcode", "3", "--kernel-name", "regex:edfkern", *drv, "--dtypes", dtypes]
    rc, out = ctx.sh(cmd, budget, {"TORCH_EXTENSIONS_DIR": ctx.ext_dir})
    summary = [line for line in out.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
    return {"ok": rc == 0, "rc": rc, "summary": summary[-2:], "driver": _pytest_summary(out) or out[-300:]}


def step_memcheck(ctx: Ctx, budget: float) -> dict:
    return _sanitize(ctx, budget, "memcheck")


def step_racecheck(ctx: Ctx, budget: float) -> dict:
    return _sanitize(ctx, budget, "racecheck")


def bench_providers(device: str) -> tuple[list[str], list[str]]:
    """(providers to pass, notes): every provider the bench lists (``compiled`` included), and why
    any of them cannot run here."""
    from edfkern.bench.cases import providers

    avail = providers(device)
    names = [p for p, why in avail.items() if why is None]
    notes = [f"provider {p} not run: {why}" for p, why in avail.items() if why is not None]
    return names, notes


def step_bench(ctx: Ctx, budget: float) -> dict:
    device = "cuda" if _cuda() else "cpu"
    names, notes = bench_providers(device)
    if not _cuda():
        names = [p for p in names if p in ("baseline", "reference")]  # tiny CPU smoke: no build needed
    for n in notes:
        ctx.log(f"  {n}")
    per = budget / len(BENCH_CONFIGS)
    res = {"ok": True, "providers": names, "notes": notes, "configs": {}}
    for cfg in BENCH_CONFIGS:
        path = os.path.join(ctx.out, f"bench-{cfg}.json")
        cmd = [_py(), "-m", "edfkern.bench", "--config", cfg, "--providers", ",".join(names), "--json", path,
               "--device", device]
        if _cuda():
            cmd += ["--modes", "fwd,bwd,full", "--budget", "0.1", "--no-isolate", "--timeout", str(int(per))]
        else:
            # one op per family; in1k's 1000 classes make the per-class loops slow even at tiny IPC
            ops = "dae_sgd_step_,cpd_trajectory_loss" + ("" if cfg == "in1k-ipc50" else ",covariance_matching_loss")
            cmd += ["--scale", "0.002", "--repeat", "1", "--no-memory", "--no-isolate", "--quick", "--modes", "fwd",
                    "--ops", ops]
        t = time.perf_counter()
        rc, out = ctx.sh(cmd, per, {"TORCH_EXTENSIONS_DIR": ctx.ext_dir})
        res["configs"][cfg] = {"rc": rc, "json": os.path.basename(path) if os.path.exists(path) else None,
                               "seconds": round(time.perf_counter() - t, 1)}
        res["ok"] &= rc == 0
    return res


def resnet18(num_classes: int = 10):
    """torchvision's ResNet-18 layout (BasicBlock x [2, 2, 2, 2], 64..512 channels), plain torch."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (y + (x if self.down is None else self.down(x))).relu()

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            chans = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
            for i, (a, b, s) in enumerate(chans, 1):
                setattr(self, f"layer{i}", nn.Sequential(Block(a, b, s), Block(b, b, 1)))
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.bn1(self.conv1(x)).relu())
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean((2, 3)))

    return ResNet18()


def per_class_cam_loop(model, layer, images, labels, num_samples: int = 4, std: float = 0.3):
    """EDF's released pattern: per class, a clean forward and ``num_samples`` noisy forward +
    ``backward()`` passes with hooks on ``layer``, then torchcam's smoothgradcam++ per image
    (:func:`edfkern.baselines.grad_cam`)."""
    import torch

    from edfkern import baselines

    store: dict = {}

    def fwd_hook(_m, _i, out):
        store["a"] = out
        if out.requires_grad:
            out.register_hook(lambda g: store.__setitem__("g", g))

    h = layer.register_forward_hook(fwd_hook)
    out = []
    try:
        for k in labels.unique().tolist():
            idx = (labels == k).nonzero().flatten()
            x = images[idx]
            with torch.no_grad():
                model(x)
            clean = store["a"].detach()
            acts, grads = [], []
            for _ in range(num_samples):
                xn = (x + torch.randn_like(x) * std).requires_grad_(True)
                model.zero_grad(set_to_none=True)
                model(xn)[:, k].sum().backward()
                acts.append(store["a"].detach())
                grads.append(store["g"].detach())
            out.append((idx, baselines.grad_cam(torch.stack(acts), torch.stack(grads), method="smoothgradcam++",
                                                clean_activations=clean)))
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    maps = torch.empty((images.shape[0],) + tuple(out[0][1].shape[1:]), device=images.device)
    for idx, m in out:
        maps[idx] = m.to(maps.dtype)
    return maps


def step_cam(ctx: Ctx, budget: float) -> dict:
    import torch

    from edfkern.bench.ceilings import call_times
    from edfkern.cam import CAMExtractor

    cuda = _cuda()
    dev = "cuda" if cuda else "cpu"
    N, px, K = (500, 128, 10) if cuda else (6, 32, 2)
    torch.manual_seed(0)
    model = resnet18(K).to(dev).eval()
    images = torch.randn(N, 3, px, px, device=dev)
    labels = torch.arange(N, device=dev) % K

    def timed(fn, reps):
        return statistics.median(call_times(fn, dev, reps))

    reps = 3 if cuda else 1
    ext = CAMExtractor(model, model.layer4, method="smoothgradcam++", num_samples=4)
    try:
        t_fused = timed(lambda: ext(images, labels), reps)
    finally:
        ext.close()
    t_loop = timed(lambda: per_class_cam_loop(model, model.layer4, images, labels), reps)
    res = {"ok": True, "device": dev, "N": N, "px": px, "K": K, "extractor_s": t_fused, "loop_s": t_loop,
           "speedup": t_loop / t_fused, "target": ">= 5x (N=500, 128 px, on a GPU)"}
    ctx.log(f"  CAMExtractor {t_fused * 1e3:.1f} ms, per-class loop {t_loop * 1e3:.1f} ms: "
            f"{t_loop / t_fused:.2f}x  (N={N}, {px} px, {dev})")
    return res


STEP_FUNCS: dict[str, Callable[[Ctx, float], dict]] = {
    "env": step_env, "ceilings": step_ceilings, "build": step_build, "tests": step_tests,
    "memcheck": step_memcheck, "racecheck": step_racecheck, "bench": step_bench, "cam": step_cam,
}


def validate(out: str, dry_run: bool = False, only: Optional[list[str]] = None) -> int:
    """Run the steps; returns 0 if every step that ran is ok, else 1."""
    if not dry_run and not _cuda():
        print("tools.gpucheck: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    out = os.path.abspath(out)  # the steps' subprocesses run in the repository
    os.makedirs(out, exist_ok=True)
    t_all = time.perf_counter()
    with open(os.path.join(out, "validate.log"), "w") as fh:
        ctx = Ctx(out=out, dry=dry_run, log_fh=fh)
        # the build tree stays outside $OUT (it must not come back with the results)
        ctx.ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or "/tmp/edfkern-gpucheck-ext"
        if dry_run:  # the CPU smoke run never builds the native extension (CI tests that elsewhere)
            os.environ["EDFKERN_NO_NATIVE"] = "1"
        ctx.log(f"tools.gpucheck validate{' --dry-run' if dry_run else ''}: {len(STEPS)} steps, "
                f"budget {TOTAL_BUDGET_S} s")
        for name, budget, what in STEPS:
            if only and name not in only:
                continue
            ctx.log(f"=== [{name}] start: {what} (budget {budget} s)")
            t = time.perf_counter()
            try:
                # the budgets are H200 seconds; on CPU (a dry run, on a shared 2-core CI machine) they
                # only bound a hung step, so they are stretched rather than enforced as timings
                res = STEP_FUNCS[name](ctx, budget * (DRY_RUN_BUDGET_FACTOR if dry_run else 1))
            except Exception as e:  # noqa: BLE001 - a failing step must not stop the later ones
                import traceback

                ctx.log(traceback.format_exc())
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            res["seconds"] = round(time.perf_counter() - t, 2)
            res["budget_s"] = budget
            res["over_budget"] = res["seconds"] > budget
            ctx.results[name] = res
            status = "skipped" if res.get("skipped") else ("ok" if res.get("ok") else "FAILED")
            ctx.log(f"=== [{name}] end: {status} in {res['seconds']:.1f} s (budget {budget} s)")
        total = time.perf_counter() - t_all
        summary = {"dry_run": dry_run, "total_s": round(total, 1), "budget_s": TOTAL_BUDGET_S,
                   "steps": ctx.results, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(os.path.join(out, "validate.json"), "w") as jf:
            json.dump(summary, jf, indent=1, default=str)
        ctx.log("")
        ctx.log(f"{'step':10s} {'status':8s} {'s':>7s} {'budget':>6s}")
        for name, res in ctx.results.items():
            status = "skipped" if res.get("skipped") else ("ok" if res.get("ok") else "FAILED")
            ctx.log(f"{name:10s} {status:8s} {res['seconds']:7.1f} {res['budget_s']:6d}")
        ctx.log(f"total {total:.1f} s (budget {TOTAL_BUDGET_S} s); results in {out}")
    return 0 if all(r.get("ok") for r in ctx.results.values()) else 1
