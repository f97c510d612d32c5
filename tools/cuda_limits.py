"""Static launch checks of the CUDA kernels (csrc/cuda) for sm_90.

    python tools/cuda_limits.py            # compile with nvcc, check everything, print the table
    python tools/cuda_limits.py --source   # only the source checks (no nvcc needed)

Checks, per kernel and per launch configuration the launchers use (``k<<<grid, block, ...>>>`` in
csrc/cuda/*.cu and *.cuh, the block size evaluated from the file's constants):

- a kernel launched at 1024 threads per block carries ``__launch_bounds__`` (else ptxas may give it
  more than 64 registers per thread and the launch fails with "too many resources requested");
- registers per thread (ptxas ``-v`` of ``nvcc -gencode arch=compute_90,code=sm_90``) x threads per
  block is at most 65,536, for every instantiation of the kernel;
- the occupancy (active warps per SM / 64) from the toolkit's host-only ``cuda_occupancy.h``
  (``tools/cuda_occupancy.cpp``, compiled with the host compiler) is reported per kernel.

Exits 1 when a check fails, 2 when a tool is missing.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
REGS_PER_BLOCK = 65536

_LAUNCH = re.compile(r"\b(\w+)\s*(?:<[^;{}]*?>)?\s*<<<(.*?)>>>", re.S)
_CONST = re.compile(r"constexpr\s+(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*([^;]+);")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _split_top(s: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([<" and 1 or (ch in ")]>" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def launches() -> dict[str, set[int]]:
    """{kernel: threads per block of each launch} over csrc/cuda/*.cu and *.cuh."""
    out: dict[str, set[int]] = {}
    for path in sorted([*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh")]):
        text = path.read_text()
        consts: dict[str, int] = {}
        for name, expr in _CONST.findall(text):
            try:  # integer constants (kThreads, kTile, ...); the rest (sizeof(...)) is not a block size
                consts[name] = int(eval(expr, {"__builtins__": {}}, dict(consts)))  # noqa: S307
            except (SyntaxError, NameError, TypeError):
                pass
        for kernel, cfg in _LAUNCH.findall(text):
            block = _split_top(cfg)[1]
            env = dict(consts, dim3=lambda *a: math.prod(a))
            try:
                threads = int(eval(block, {"__builtins__": {}}, env))  # noqa: S307
            except Exception as e:  # noqa: BLE001
                raise SystemExit(f"{path.name}: cannot evaluate the block size '{block}' of {kernel}: {e}")
            out.setdefault(kernel, set()).add(threads)
    return out


def has_launch_bounds(kernel: str) -> bool:
    pat = re.compile(r"__global__\s+(?:void\s+)?__launch_bounds__\([^)]*\)\s*(?:void\s+)?" + kernel + r"\b")
    return any(pat.search(p.read_text()) for p in [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh")])


def source_problems(used: dict[str, set[int]]) -> list[str]:
    return [f"{k}: launched at 1024 threads per block without __launch_bounds__"
            for k, ts in sorted(used.items()) if 1024 in ts and not has_launch_bounds(k)]


def _base_name(demangled: str) -> str:
    d = demangled.replace("(anonymous namespace)::", "")
    m = re.match(r"(?:void\s+)?(?:\w+::)*(\w+)", d)
    return m.group(1) if m else d


def registers(nvcc: str) -> dict[str, list[tuple[int, int]]]:
    """{kernel: [(registers, static shared bytes) per instantiation]} from ptxas -v for sm_90."""
    out: dict[str, list[tuple[int, int]]] = {}
    with tempfile.TemporaryDirectory() as td:
        for cu in sorted(CUDA_DIR.glob("*.cu")):
            cmd = [nvcc, "-std=c++17", "-O3", f"-I{REPO / 'csrc' / 'include'}", "-gencode",
                   "arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c", str(cu), "-o", os.path.join(td, "k.o")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"nvcc failed on {cu.name}:\n{res.stderr[-3000:]}")
            entries, cur = [], None
            for line in res.stderr.splitlines():
                m = _ENTRY.search(line)
                if m:
                    cur = m.group(1)
                    continue
                m = _USED.search(line)
                if m and cur:
                    s = _SMEM.search(line)
                    entries.append((cur, int(m.group(1)), int(s.group(1)) if s else 0))
                    cur = None
            names = subprocess.run(["c++filt"], input="\n".join(e[0] for e in entries), capture_output=True,
                                   text=True).stdout.splitlines()
            for (_, regs, smem), name in zip(entries, names):
                out.setdefault(_base_name(name), []).append((regs, smem))
    return out


def occupancy(rows: list[tuple[int, int, int]]) -> list[str]:
    """'blocks occupancy limit' per (threads, registers, shared) row, from tools/cuda_occupancy.cpp."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(nvcc).resolve().parents[1]) if nvcc else None]
    inc = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_occupancy.h").is_file()), None)
    if inc is None:
        print("cuda_limits: cuda_occupancy.h not found (set CUDA_HOME)", file=sys.stderr)
        sys.exit(2)
    cxx = os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory() as td:
        exe = os.path.join(td, "occ")
        subprocess.run([cxx, "-std=c++17", f"-I{inc}", str(Path(__file__).with_name("cuda_occupancy.cpp")), "-o", exe],
                       check=True)
        text = "".join(f"{t} {r} {s}\n" for t, r, s in rows)
        return subprocess.run([exe], input=text, capture_output=True, text=True, check=True).stdout.splitlines()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", action="store_true", help="only the source checks (no nvcc)")
    args = ap.parse_args(argv)
    used = launches()
    problems = source_problems(used)
    if not args.source:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            print("cuda_limits: no nvcc on PATH", file=sys.stderr)
            return 2
        regs = registers(nvcc)
        rows, keys = [], []
        for k in sorted(used):
            if k not in regs:
                problems.append(f"{k}: launched but not found in ptxas' output")
                continue
            worst = max(regs[k])
            for t in sorted(used[k]):
                rows.append((t, worst[0], worst[1]))
                keys.append((k, t, worst))
                if worst[0] * t > REGS_PER_BLOCK:
                    problems.append(f"{k}: {worst[0]} registers x {t} threads = {worst[0] * t} > {REGS_PER_BLOCK}")
        print(f"{'kernel':<18}{'threads':>8}{'regs':>6}{'regs x threads':>16}{'smem':>7}{'blocks/SM':>11}"
              f"{'occupancy':>11}  limit")
        for (k, t, (r, s)), occ in zip(keys, occupancy(rows)):
            b, o, lim = occ.split()
            print(f"{k:<18}{t:>8}{r:>6}{r * t:>16}{s:>7}{b:>11}{float(o):>11.0%}  {lim}")
    for p in problems:
        print("FAIL", p)
    print("cuda_limits:", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
