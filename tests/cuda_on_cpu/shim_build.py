"""Build csrc/cuda/*.cu for the CPU under the shim (tests/cuda_on_cpu/shim): the CUDA-source-on-CPU tier.

The one change made to the sources is mechanical: every launch ``k<<<g, b, s, st>>>(args)`` becomes
``::cucpu::launch(__FILE__, __LINE__, [](auto... a_) { k(a_...); }, g, b, s, st)(args)`` on the same
line, and the file starts with the stand-in ``<cuda_runtime.h>`` and ``#line 1 "<the real path>"``, so
compiler errors, sanitizer reports and the shim's messages point at the real file and line.

Objects and the shared library are cached under ``$EDFKERN_CUDA_ON_CPU_CACHE`` (default
``$TMPDIR/edfkern-cuda-on-cpu``), each keyed by a hash of what it is compiled from and the flags.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
FAMILIES = ("dae", "gradcam", "cpd", "covariance", "features")

# -fno-gnu-unique: template statics (the __shared__ storage of block_reduce) stay private to each
# library; as STB_GNU_UNIQUE the dynamic linker would bind them to the first library loaded
BASE_FLAGS = ["-std=c++17", "-fPIC", "-ffp-contract=off", "-fno-gnu-unique", "-Wall", "-Wno-unused-function"]
VARIANTS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


def cxx() -> str:
    return os.environ.get("CXX", "g++")


def cuda_include() -> Path:
    """The CUDA toolkit's include directory (for cuda_fp16.h, cuda_bf16.h, vector_types.h, driver_types.h)."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(os.path.realpath(nvcc)).parents[1] / "include"
        if (inc / "cuda_fp16.h").is_file():
            return inc
    raise FileNotFoundError("the CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME")


def cache_root() -> Path:
    root = os.environ.get("EDFKERN_CUDA_ON_CPU_CACHE") or os.path.join(tempfile.gettempdir(), "edfkern-cuda-on-cpu")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- the launch rewrite


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (``name``, ``ns::name<T, U>``) that ends just before ``end``."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # explicit template arguments: back over the balanced <...>
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str) -> tuple[str, int]:
    """``(text with every k<<<cfg>>>(args) rewritten, number of launches)``; line breaks are kept."""
    out, pos, count = [], 0, 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            break
        j = text.find(">>>", i)
        if j < 0:
            raise ValueError(f"unterminated <<< at offset {i}")
        start = _kernel_start(text, i)
        kernel = text[start:i].strip()
        if not re.fullmatch(r"[\w:]+(<.*>)?", kernel, re.S):
            raise ValueError(f"cannot parse the kernel of a launch: {kernel!r}")
        cfg = text[i + 3:j]
        out.append(text[pos:start])
        out.append(f"::cucpu::launch(__FILE__, __LINE__, [](auto... a_) {{ {kernel}(a_...); }}, {cfg})")
        pos = j + 3
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def translate(path: Path) -> str:
    """The text g++ reads for ``path`` (a .cu or .cuh of csrc/cuda): launches rewritten, the stand-in
    runtime header first, line numbers those of ``path``."""
    body, _ = rewrite_launches(path.read_text())
    return f'#include <cuda_runtime.h>\n#line 1 "{path}"\n{body}'


def translated_tree(csrc: Path, out_dir: Path) -> Path:
    """A folder holding every csrc/cuda/*.cu and *.cuh translated (their quoted includes find each other)."""
    files = sorted([*(csrc / "cuda").glob("*.cu"), *(csrc / "cuda").glob("*.cuh")])
    texts = {f.name: translate(f) for f in files}
    tree = out_dir / f"src-{_digest(*(n + t for n, t in texts.items()))}"
    if not tree.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=out_dir))
        for name, text in texts.items():
            (tmp / name).write_text(text)
        try:
            os.replace(tmp, tree)
        except OSError:  # built concurrently by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return tree


# ----------------------------------------------------------------------------- compile and link


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compile(src: Path, name: str, flags: list[str], include: list[Path], key: str, out_dir: Path) -> Path:
    obj = out_dir / f"{name}-{key}.o"
    if obj.exists():
        return obj
    tmp = obj.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx(), *flags, *(f"-I{p}" for p in include), "-x", "c++", "-c", str(src), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling {name} for the CPU failed:\n{' '.join(cmd)}\n{res.stderr}")
    if name in FAMILIES:
        _gather_shared(tmp)
    os.replace(tmp, obj)
    return obj


def _gather_shared(obj: Path) -> None:
    """Move the __shared__ variables of function templates into the cucpu_shared section.

    The stand-in's ``__shared__`` puts function-local statics there with a section attribute, which
    GCC ignores inside templates (their statics get a comdat ``.bss.<symbol>`` section each); the
    runtime fills the section with 0xff before each block, so each such section is renamed. Only
    statics of edfkern's functions (``_ZZN7edfkern``) exist in the kernels' files as __shared__."""
    out = subprocess.run(["readelf", "-SW", str(obj)], capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"\s(\.(?:bss|data)\._ZZN7edfkern\S+)", out)))
    if names:
        args = [a for n in names for a in ("--rename-section", f"{n}=cucpu_shared")]
        subprocess.run(["objcopy", *args, str(obj)], check=True, capture_output=True)


def build(variant: str = "plain", csrc: Path = CSRC, families=FAMILIES) -> Path:
    """The shared library with ``families`` (``csrc/cuda/<family>.cu``) of ``csrc``, the shim and the
    extern "C" bridge, compiled with the ``variant``'s flags; cached."""
    csrc = Path(csrc).resolve()
    out_dir = cache_root()
    tree = translated_tree(csrc, out_dir)
    flags = BASE_FLAGS + VARIANTS[variant] + [f"-DCUCPU_HAS_{f.upper()}" for f in sorted(families)]
    include = [SHIM, cuda_include(), csrc / "include", tree]
    version = subprocess.run([cxx(), "--version"], capture_output=True, text=True).stdout
    headers = sorted([*tree.glob("*.cuh"), *(csrc / "include" / "edfkern").glob("*.h"), *SHIM.glob("*.h")])
    common = _digest(version, flags, include[:3], *(h.name.encode() + h.read_bytes() for h in headers))
    sources = {f: tree / f"{f}.cu" for f in families}
    sources.update(runtime=SHIM / "runtime.cpp", bridge=SHIM / "bridge.cpp")
    workers = max(1, min(len(sources), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futs = [pool.submit(_compile, src, name, flags, include, _digest(common, src.read_bytes()), out_dir)
                for name, src in sources.items()]
        objs = [f.result() for f in futs]
    lib = out_dir / f"libcudaoncpu-{variant}-{_digest(*(o.name for o in objs))}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        # -Bsymbolic: each library's shim state binds to itself when several are loaded in one process
        link = [cxx(), "-shared", "-Wl,-Bsymbolic", *VARIANTS[variant], "-o", str(tmp), *map(str, objs)]
        res = subprocess.run(link, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"linking the CPU build failed:\n{' '.join(link)}\n{res.stderr}")
        os.replace(tmp, lib)
    return lib


if __name__ == "__main__":
    import sys
    import time

    t0 = time.time()
    print(build(sys.argv[1] if len(sys.argv) > 1 else "plain"), f"{time.time() - t0:.1f} s")
