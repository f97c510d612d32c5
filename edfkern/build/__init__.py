"""Build the native extension ``edfkern._C`` (sources, flags, ahead-of-time entry points).

``python -m edfkern.build`` compiles the extension now (the same cached just-in-time build that
the first native op call would do) and prints where it lives; ``--force`` rebuilds it.

``setup.py`` loads this file by path (no ``import edfkern``, which would need torch) and, with
``EDFKERN_BUILD_EXT=1``, calls :func:`ahead_of_time_extension` to compile ``edfkern._C`` into the
wheel. Everything that needs torch is imported inside the functions.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Optional

# torch adds its own -std (c++20 for torch 2.13). No FMA contraction: results stay close to PyTorch's.
CXX_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-DNDEBUG"]
LD_FLAGS = ["-fopenmp"]
# EDFKERN_SANITIZE=1 (CPU only, just-in-time builds): AddressSanitizer + UndefinedBehaviorSanitizer, every
# finding fatal, frame pointers kept for readable stacks, into a build directory of its own. Load it
# with LD_PRELOAD=$(c++ -print-file-name=libasan.so) (python itself is not instrumented); .ci/sanitize.sh.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def sanitize() -> bool:
    """Whether ``EDFKERN_SANITIZE=1`` asks for the sanitizer build."""
    return os.environ.get("EDFKERN_SANITIZE", "0") not in ("", "0")


def cxx_flags() -> list[str]:
    """Host compiler flags of a just-in-time build: the release flags, or -O1 plus the sanitizers."""
    if sanitize():
        # -march=native here too, so the sanitizers see the CPU-specific vector paths (AVX-512 CM)
        return [f for f in CXX_FLAGS if f not in ("-O3", "-DNDEBUG")] + ["-O1"] + SANITIZE_FLAGS + host_arch_flags()
    return list(CXX_FLAGS) + host_arch_flags()


def ld_flags() -> list[str]:
    return list(LD_FLAGS) + (["-fsanitize=address,undefined"] if sanitize() else [])
CUDA_ARCHS = ("80", "90")


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # edfkern/, this file's package's parent


def csrc_dir() -> Optional[str]:
    """The ``csrc`` folder: inside the package (wheel installs) or at the repository top (editable/repo)."""
    for cand in (os.path.join(_PACKAGE, "csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(cand, "edfkern.cpp")):
            return cand
    return None


def sources(root: str, with_cuda: bool) -> list[str]:
    """Every translation unit: the bindings (``edfkern.cpp``) and the CPU kernels; ``with_cuda`` also
    the CUDA kernels (``cuda/*.cu``) and ``cuda/*.cpp``, the one host file that needs torch's CUDA headers."""
    srcs = [os.path.join(root, "edfkern.cpp")] + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(os.path.join(root, "cuda", "*.cpp")))
        srcs += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    return srcs


def include_dirs(root: str) -> list[str]:
    return [os.path.abspath(root), os.path.abspath(os.path.join(root, "include"))]


def host_arch_flags() -> list[str]:
    """``-march=native`` for just-in-time builds (they run where they are built) unless
    ``EDFKERN_MARCH_NATIVE=0``; ahead-of-time builds (wheels) stay portable and never use it."""
    if os.environ.get("EDFKERN_MARCH_NATIVE", "1") == "0":
        return []
    import platform

    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []


def cuda_reason() -> Optional[str]:
    """None when the CUDA part can be built against this torch, else why not."""
    if os.environ.get("EDFKERN_NO_CUDA", "0") == "1":
        return "EDFKERN_NO_CUDA=1 set"
    if sanitize():
        return "EDFKERN_SANITIZE=1 builds the CPU kernels only"
    import torch

    if torch.version.cuda is None:
        return "this torch has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "no CUDA toolkit (nvcc) found"
    return None


def nvcc_arch_flags(jit: bool = False) -> list[str]:
    """``-gencode`` flags from ``EDFKERN_CUDA_ARCHS`` (e.g. ``80,90``). Without it, a just-in-time
    build leaves the choice to torch (the local GPU, or ``TORCH_CUDA_ARCH_LIST``) and an
    ahead-of-time build targets sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` is set."""
    env = os.environ.get("EDFKERN_CUDA_ARCHS")
    if env is None and (jit or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        return []
    archs = (env or ",".join(CUDA_ARCHS)).split(",")
    return [f"-gencode=arch=compute_{a.strip()},code=sm_{a.strip()}" for a in archs if a.strip()]


def max_jobs() -> str:
    """Parallel compile jobs, capped by cores and by memory (about 2 GB per nvcc/g++ job)."""
    jobs = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        jobs = max(1, min(jobs, int(mem_gb // 2)))
    except (ValueError, OSError, AttributeError):
        pass
    return str(jobs)


def ahead_of_time_extension():
    """``(ext_modules, cmdclass)`` for setup.py: ``edfkern._C`` as a CppExtension or CUDAExtension."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    root = csrc_dir()
    if root is None:
        raise RuntimeError("edfkern: csrc/ not found next to the package; cannot build the extension")
    force = os.environ.get("EDFKERN_FORCE_CUDA", "0") == "1"
    with_cuda = cuda_reason() is None or force
    rel = [os.path.relpath(s, os.path.dirname(_PACKAGE)) for s in
           sources(root, with_cuda)]
    kw = dict(include_dirs=include_dirs(root), extra_link_args=LD_FLAGS)
    if with_cuda:
        ext = CUDAExtension("edfkern._C", rel, define_macros=[("EDFKERN_WITH_CUDA", None)],
                            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + nvcc_arch_flags()}, **kw)
    else:
        ext = CppExtension("edfkern._C", rel, extra_compile_args={"cxx": CXX_FLAGS}, **kw)
    os.environ.setdefault("MAX_JOBS", max_jobs())
    return [ext], {"build_ext": BuildExtension}
