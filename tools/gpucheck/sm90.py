"""Compile every GPU kernel for sm_90 (H100/H200) on a machine without a GPU, and check its resources.

Triton: every specialisation :mod:`tools.gpucheck.capture` records is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (PTX for sm_90a, then a
cubin through Triton's bundled ptxas). CUDA: every ``csrc/cuda/*.cu`` is compiled with
``nvcc -gencode arch=compute_90,code=sm_90`` and read back with ``cuobjdump
--dump-resource-usage``. Per kernel the report gives registers, spill bytes (stores + loads,
per thread, from ptxas ``-v``) and shared memory.

Policy (what fails): a compile error; a spill; shared memory above the 227 KB a block may use
on an H100/H200. A kernel may carry a spill or that much shared memory only with a comment
``# gpucheck: allow-spill <why>`` (or ``allow-smem``) in its Triton source, or
``// gpucheck: allow-spill <why>`` in the .cu file. Registers at the 255 cap are reported,
not failed.

Results are cached by the kernel's source hash, its specialisation and the tool versions
(``$EDFKERN_GPUCHECK_CACHE``, default ``~/.cache/edfkern-gpucheck``), so a rerun with no
kernel change compiles nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

from .capture import DTYPE_PREFIX, VARIANT_PRECISIONS, Spec, capture

SMEM_LIMIT = 227 * 1024   # bytes of shared memory one block may use on sm_90 (opt-in maximum)
REG_CAP = 255
ALLOW_SPILL = "gpucheck: allow-spill"
ALLOW_SMEM = "gpucheck: allow-smem"

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'|Function properties for (\S+)")


def cache_dir() -> str:
    d = os.environ.get("EDFKERN_GPUCHECK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edfkern-gpucheck")
    os.makedirs(d, exist_ok=True)
    return d


def _cached(key: str, compute) -> dict:
    path = os.path.join(cache_dir(), hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    if os.path.exists(path):
        try:
            with open(path) as fh:
                out = json.load(fh)
            out["cached"] = True
            return out
        except (OSError, ValueError):
            pass
    out = compute()
    if out.get("ok"):
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh)
        os.replace(tmp, path)
    out["cached"] = False
    return out


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas ``-v`` output -> {function: {regs, spill_stores, spill_loads, stack, smem}}."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1) or m.group(2)
            out.setdefault(cur, {"regs": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0})
            continue
        if cur is None:
            continue
        if (m := _PTXAS_SPILL.search(line)):
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if (m := _PTXAS_REGS.search(line)):
            out[cur]["regs"] = int(m.group(1))
            if (s := _PTXAS_SMEM.search(line)):
                out[cur]["smem"] = int(s.group(1))
    return out


# ----------------------------------------------------------------------------- Triton


def _kernel_fn(spec: Spec):
    import importlib

    return getattr(importlib.import_module(spec.module), spec.kernel)


def _constexprs(spec: Spec) -> dict[str, Any]:
    import triton.language as tl

    out = {}
    for k, v in spec.constexprs:
        if isinstance(v, str) and v.startswith(DTYPE_PREFIX):
            v = tl.str_to_ty(v[len(DTYPE_PREFIX):], None) if hasattr(tl, "str_to_ty") else getattr(tl, v[3:])
        out[k] = v
    return out


def _compile_triton(spec: Spec) -> dict:
    """Compile one specialisation for sm_90; resources from the ptxas log Triton prints."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    fn = _kernel_fn(spec)
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=_constexprs(spec),
                    attrs={(i,): [["tt.divisibility", 16]] for i in spec.divisible})
    buf = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # noqa: BLE001 - a compile error is the finding
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}", "seconds": time.perf_counter() - t0}
    res = parse_ptxas(buf.getvalue())
    r = res.get(k.metadata.name) or (next(iter(res.values())) if res else {})
    ptx = k.asm.get("ptx", "")
    return {"ok": True, "regs": r.get("regs"), "spill_stores": r.get("spill_stores", 0),
            "spill_loads": r.get("spill_loads", 0), "stack": r.get("stack", 0),
            "shared": int(k.metadata.shared), "ptx_target": (re.search(r"\.target (\S+)", ptx) or [None, None])[1],
            "cubin_bytes": len(k.asm.get("cubin", b"")),
            "mma": "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none"),
            "seconds": time.perf_counter() - t0}


def _triton_key(spec: Spec) -> str:
    import triton

    return json.dumps(["triton", triton.__version__, _kernel_fn(spec).cache_key, spec.to_json()], sort_keys=True)


def _triton_job(spec: Spec) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    return _cached(_triton_key(spec), lambda: _compile_triton(spec))


def _allowed(fn, marker: str) -> bool:
    import inspect

    try:
        return marker in inspect.getsource(fn.fn)
    except (OSError, TypeError):
        return False


def triton_variants(configs: Optional[list[str]], known: set) -> list[tuple[Spec, str, list[str]]]:
    """The tl.dot kernels as the launchers specialise them with input_precision tf32 (reachable:
    ``edfkern.config.allow_tf32``) and tf32x3 (a candidate default): (spec, precision, used_by)."""
    out = []
    for prec in VARIANT_PRECISIONS:
        for spec, labels in capture(configs, precision=prec, only=("cov_",)).items():
            cx = dict(spec.constexprs)
            if spec not in known and cx.get("PRECISION") == prec and cx.get("USE_DOT") is True:
                out.append((spec, prec, labels))
    return out


def check_triton(configs: Optional[list[str]] = None, jobs: int = 0, variants: bool = True,
                 log=print) -> dict:
    """Capture, compile and judge every Triton specialisation. Returns the JSON-ready report."""
    t0 = time.perf_counter()
    found = capture(configs)
    specs = list(found)
    jobs_list: list[tuple[Spec, str, list[str]]] = [(s, "default", found[s]) for s in specs]
    if variants:
        jobs_list += triton_variants(configs, set(specs))
    log(f"triton: {len(specs)} specialisations of {len({s.name for s in specs})} kernels captured in "
        f"{time.perf_counter() - t0:.1f} s; compiling {len(jobs_list)} for sm_90")
    n = jobs or max(1, os.cpu_count() or 1)
    env_saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        if n == 1:
            results = [_triton_job(s) for s, _, _ in jobs_list]
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as ex:
                results = list(ex.map(_triton_job, [s for s, _, _ in jobs_list]))
    finally:
        if env_saved is not None:
            os.environ["TRITON_INTERPRET"] = env_saved
    rows = []
    for (spec, variant, used_by), res in zip(jobs_list, results):
        fn = _kernel_fn(spec)
        spill = (res.get("spill_stores") or 0) + (res.get("spill_loads") or 0)
        problems = []
        if not res.get("ok"):
            problems.append("compile error")
        if spill and not _allowed(fn, ALLOW_SPILL):
            problems.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
        if (res.get("shared") or 0) > SMEM_LIMIT and not _allowed(fn, ALLOW_SMEM):
            problems.append(f"shared {res['shared']} B > {SMEM_LIMIT}")
        enforced = variant in ("default", "tf32")  # no launcher selects tf32x3: reported only
        rows.append({"kernel": spec.name, "variant": variant, "spec": spec.describe(), "spec_json": spec.to_json(),
                     "used_by": used_by[:4], "n_used_by": len(used_by), **res,
                     "problems": problems, "fails": bool(problems) and enforced})
    return {"kind": "triton", "n_specs": len(specs), "n_compiled": len(rows), "rows": rows,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- CUDA


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    for cand in ([os.path.join(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []) + [shutil.which("nvcc") or ""]:
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuobjdump(nvcc: str) -> Optional[str]:
    cand = os.path.join(os.path.dirname(nvcc), "cuobjdump")
    if os.path.exists(cand):
        return cand
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton

        b = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return b if os.path.exists(b) else None
    except ImportError:
        return None


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {mangled function: {REG, STACK, SHARED, LOCAL}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


def _compile_cu(path: str, nvcc: str, flags: list[str]) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        obj = os.path.join(td, "k.o")
        cmd = [nvcc, *flags, "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c", path, "-o", obj]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            return {"ok": False, "error": (p.stderr or p.stdout)[-3000:], "cmd": " ".join(cmd),
                    "seconds": time.perf_counter() - t0}
        ptxas = parse_ptxas(p.stderr)
        tool = _cuobjdump(nvcc)
        usage = {}
        if tool:
            q = subprocess.run([tool, "--dump-resource-usage", obj], capture_output=True, text=True)
            usage = parse_resource_usage(q.stdout)
    names = sorted(set(ptxas) | set(usage))
    dm = _demangle(names)
    funcs = []
    for n in names:
        u, r = usage.get(n, {}), ptxas.get(n, {})
        funcs.append({"mangled": n, "name": dm.get(n, n), "regs": u.get("REG", r.get("regs")),
                      "shared": u.get("SHARED", r.get("smem", 0)), "stack": u.get("STACK", r.get("stack", 0)),
                      "local": u.get("LOCAL", 0), "spill_stores": r.get("spill_stores", 0),
                      "spill_loads": r.get("spill_loads", 0)})
    return {"ok": True, "functions": funcs, "cmd": " ".join(cmd), "seconds": time.perf_counter() - t0}


def _cu_job(args: tuple[str, str, list[str], str]) -> dict:
    path, nvcc, flags, key = args
    return _cached(key, lambda: _compile_cu(path, nvcc, flags))


def check_cuda(jobs: int = 0, log=print) -> dict:
    """Compile every csrc/cuda/*.cu for sm_90 and judge each kernel's resources."""
    import glob

    from edfkern import build

    t0 = time.perf_counter()
    root = build.csrc_dir()
    nvcc = _nvcc()
    if root is None or nvcc is None:
        why = "csrc/ not found" if root is None else "no nvcc"
        log(f"cuda: skipped: {why}")
        return {"kind": "cuda", "skipped": why, "rows": [], "seconds": 0.0}
    flags = [*build.NVCC_FLAGS, "-std=c++17", *[f"-I{d}" for d in build.include_dirs(root)]]
    files = sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    headers = sorted(glob.glob(os.path.join(root, "cuda", "*.cuh")) + glob.glob(os.path.join(root, "include", "**", "*.h"),
                                                                               recursive=True))
    hdr_hash = hashlib.sha256(b"".join(open(h, "rb").read() for h in headers)).hexdigest()
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    args = []
    for f in files:
        key = json.dumps(["cu", ver, flags, hdr_hash, hashlib.sha256(open(f, "rb").read()).hexdigest(), f], sort_keys=True)
        args.append((f, nvcc, flags, key))
    log(f"cuda: compiling {len(files)} files with {os.path.basename(nvcc)} {' '.join(ver)} for sm_90")
    n = max(1, min(len(args), jobs or os.cpu_count() or 1))
    with ProcessPoolExecutor(n) as ex:
        results = list(ex.map(_cu_job, args))
    rows = []
    for f, res in zip(files, results):
        src = open(f).read()
        base = os.path.basename(f)
        if not res.get("ok"):
            rows.append({"file": base, "kernel": base, "ok": False, "error": res.get("error"),
                         "problems": ["compile error"], "fails": True})
            continue
        for fn in res["functions"]:
            spill = fn["spill_stores"] + fn["spill_loads"]
            problems = []
            if spill and ALLOW_SPILL not in src:
                problems.append(f"spills {fn['spill_stores']} B stores / {fn['spill_loads']} B loads")
            if (fn["shared"] or 0) > SMEM_LIMIT and ALLOW_SMEM not in src:
                problems.append(f"shared {fn['shared']} B > {SMEM_LIMIT}")
            rows.append({"file": base, "kernel": fn["name"], "ok": True, **fn, "cached": res.get("cached"),
                         "problems": problems, "fails": bool(problems)})
    return {"kind": "cuda", "files": [os.path.basename(f) for f in files], "rows": rows,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- report


def summarise_triton(rows: list[dict]) -> list[dict]:
    """One line per (kernel, variant): specs, max registers, max spill, max shared, failures."""
    by: dict[tuple[str, str], dict] = {}
    for r in rows:
        k = (r["kernel"], r["variant"])
        s = by.setdefault(k, {"kernel": r["kernel"], "variant": r["variant"], "specs": 0, "regs_min": None,
                              "regs_max": 0, "spill_max": 0, "shared_max": 0, "mma": set(), "fails": 0,
                              "errors": 0, "worst": None})
        s["specs"] += 1
        if not r.get("ok"):
            s["errors"] += 1
            s["fails"] += 1
            continue
        regs = r.get("regs") or 0
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        s["regs_min"] = regs if s["regs_min"] is None else min(s["regs_min"], regs)
        if regs >= s["regs_max"]:
            s["regs_max"], s["worst"] = regs, r["spec"]
        s["spill_max"] = max(s["spill_max"], spill)
        s["shared_max"] = max(s["shared_max"], r.get("shared") or 0)
        s["mma"].add(r.get("mma", "none"))
        s["fails"] += int(r["fails"])
    out = list(by.values())
    for s in out:
        s["mma"] = ",".join(sorted(s["mma"]))
    return out


def format_report(report: dict) -> str:
    lines = []
    tr = report.get("triton")
    if tr:
        lines.append(f"Triton, sm_90 ({tr['n_specs']} captured specialisations, {tr['n_compiled']} compiled):")
        lines.append(f"  {'kernel':32s} {'variant':8s} {'specs':>5s} {'regs':>9s} {'spill B':>8s} {'smem B':>8s} "
                     f"{'dot':>6s} fails")
        for s in summarise_triton(tr["rows"]):
            regs = f"{s['regs_min']}-{s['regs_max']}" if s["regs_min"] is not None else "-"
            cap = " (at cap)" if s["regs_max"] >= REG_CAP else ""
            lines.append(f"  {s['kernel']:32s} {s['variant']:8s} {s['specs']:5d} {regs:>9s} {s['spill_max']:8d} "
                         f"{s['shared_max']:8d} {s['mma']:>6s} {s['fails']}{cap}")
    cu = report.get("cuda")
    if cu:
        if cu.get("skipped"):
            lines.append(f"CUDA: skipped ({cu['skipped']})")
        else:
            lines.append(f"CUDA, nvcc sm_90 ({len(cu['rows'])} kernel instantiations in {len(cu['files'])} files):")
            by: dict[str, dict] = {}
            for r in cu["rows"]:
                name = re.sub(r"<.*", "", r["kernel"].replace("(anonymous namespace)::", "")).replace("void ", "")
                name = name.split("(")[0]
                b = by.setdefault(f"{r['file']}:{name}", {"n": 0, "regs": 0, "spill": 0, "shared": 0, "stack": 0,
                                                           "fails": 0})
                b["n"] += 1
                b["regs"] = max(b["regs"], r.get("regs") or 0)
                b["spill"] = max(b["spill"], (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0))
                b["shared"] = max(b["shared"], r.get("shared") or 0)
                b["stack"] = max(b["stack"], r.get("stack") or 0)
                b["fails"] += int(r["fails"])
            lines.append(f"  {'kernel':48s} {'inst':>4s} {'regs':>5s} {'spill B':>8s} {'stack':>6s} {'smem B':>8s} fails")
            for k, b in by.items():
                lines.append(f"  {k:48s} {b['n']:4d} {b['regs']:5d} {b['spill']:8d} {b['stack']:6d} {b['shared']:8d} "
                             f"{b['fails']}")
    fails = [r for part in ("triton", "cuda") for r in (report.get(part) or {}).get("rows", []) if r.get("fails")]
    for r in fails[:20]:
        lines.append(f"FAIL {r['kernel']} [{r.get('spec', r.get('file'))}]: {'; '.join(r['problems'])}"
                     + (f"\n     {r.get('error', '')[:600]}" if r.get("error") else ""))
    lines.append(f"{len(fails)} failing row(s)" if fails else "OK: every kernel compiles for sm_90 within the policy")
    return "\n".join(lines)


def compile_sm90(json_path: Optional[str] = None, configs: Optional[list[str]] = None, jobs: int = 0,
                 triton_only: bool = False, cuda_only: bool = False, variants: bool = True, log=print) -> int:
    """The ``compile-sm90`` command: returns the exit code (1 on any failing row)."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {}
    if not cuda_only:
        report["triton"] = check_triton(configs, jobs, variants, log)
    if not triton_only:
        report["cuda"] = check_cuda(jobs, log)
    report["seconds"] = time.perf_counter() - t0
    text = format_report(report)
    log(text)
    log(f"compile-sm90: {report['seconds']:.1f} s")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    fails = sum(bool(r.get("fails")) for part in ("triton", "cuda") for r in (report.get(part) or {}).get("rows", []))
    return 1 if fails else 0
