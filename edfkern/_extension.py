"""Build and load the native extension ``edfkern._C`` (C++ CPU kernels, CUDA kernels when possible).

Nothing happens at ``import edfkern``. The first call to :func:`load` (made by the ``native``
backend's probe, i.e. on the first native op or ``edfkern.backends()``) either imports an
ahead-of-time build (``edfkern._C``, from ``EDFKERN_BUILD_EXT=1 pip install``) or compiles the
sources just in time with ninja into a cache that survives across runs:
``$TORCH_EXTENSIONS_DIR/edfkern-<tag>`` or ``~/.cache/edfkern/<tag>``, where ``<tag>`` names the
torch version and CUDA flavour. The result (module or reason) is memoised, so later calls are
instant. On failure the reason is returned, one warning is issued, and dispatch falls back to
the next backend. ``EDFKERN_NO_NATIVE=1`` disables the extension; ``EDFKERN_SANITIZE=1`` builds the
CPU kernels with AddressSanitizer and UBSan into a cache directory of their own (``.ci/sanitize.sh``).
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
import warnings
from types import ModuleType
from typing import Optional

from . import build as _build

_LOCK = threading.Lock()
_STATE: dict = {"done": False, "module": None, "reason": None}


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's model and feature flags: a ``-march=native`` build cached in a
    shared home directory must not be loaded on a node with another CPU (it would die of SIGILL)."""
    import hashlib

    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        import platform

        lines = [platform.processor(), platform.machine()]
    return "-" + hashlib.sha1("".join(lines).encode()).hexdigest()[:8]


def _tag(with_cuda: bool) -> str:
    import torch

    ver = torch.__version__.split("+")[0]
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    arch = f"-native{_cpu_fingerprint()}" if _build.host_arch_flags() else ""
    san = "-asan-ubsan" if _build.sanitize() else ""  # its own build directory, never mixed with release builds
    return f"torch{ver}-{flavour}{arch}{san}-py{sys.version_info[0]}{sys.version_info[1]}"


def _want_cuda() -> tuple[bool, str]:
    why = _build.cuda_reason()
    if why is not None:
        return False, why
    if os.environ.get("EDFKERN_FORCE_CUDA", "0") == "1":
        return True, ""
    import torch

    if not torch.cuda.is_available():  # a just-in-time build for a machine with no usable GPU
        return False, "no CUDA device"
    return True, ""


def build_dir(with_cuda: Optional[bool] = None) -> str:
    if with_cuda is None:
        with_cuda = _want_cuda()[0]
    tag = _tag(with_cuda)
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return os.path.join(base, f"edfkern-{tag}")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "edfkern", tag)


def _compiler_reason() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return "no C++ compiler" + (f" (CXX={cxx} not found)" if "CXX" in os.environ else " (c++ not on PATH)")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on its own path)
        except ImportError:
            return "ninja not found (pip install ninja)"
    return None


def _short(e: BaseException) -> str:
    """The first telling line of a build error."""
    text = str(e).strip()
    for line in text.splitlines():
        if "error" in line.lower() and "ninja: build stopped" not in line:
            return line.strip()[:300]
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _import_prebuilt() -> Optional[ModuleType]:
    try:
        return importlib.import_module("edfkern._C")
    except ImportError:
        return None
    except OSError:  # built against another torch: fall through to the just-in-time build
        return None


def _jit(verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load as _load

    root = _build.csrc_dir()
    if root is None:
        raise RuntimeError("csrc/ sources not found (neither in the package nor beside it)")
    with_cuda, _ = _want_cuda()
    bdir = build_dir(with_cuda)
    os.makedirs(bdir, exist_ok=True)
    so_exists = any(f.endswith(".so") for f in os.listdir(bdir))
    if not so_exists:
        print(f"edfkern: compiling the native extension ({'CPU + CUDA' if with_cuda else 'CPU'}) into {bdir}; "
              "this happens once", file=sys.stderr, flush=True)
    os.environ.setdefault("MAX_JOBS", _build.max_jobs())
    kw = {}
    cflags = _build.cxx_flags()
    if with_cuda:
        cflags.append("-DEDFKERN_WITH_CUDA")
        kw["extra_cuda_cflags"] = _build.NVCC_FLAGS + _build.nvcc_arch_flags(jit=True) + ["-DEDFKERN_WITH_CUDA"]
    mod = _load(name="edfkern_C", sources=_build.sources(root, with_cuda), extra_cflags=cflags,
                extra_ldflags=_build.ld_flags(), extra_include_paths=_build.include_dirs(root),
                build_directory=bdir, verbose=verbose, with_cuda=with_cuda, is_python_module=True, **kw)
    sys.modules.setdefault("edfkern._C", mod)
    return mod


def load(verbose: bool = False) -> tuple[Optional[ModuleType], Optional[str]]:
    """``(module, None)`` when the extension is usable, else ``(None, reason)``; memoised."""
    if _STATE["done"]:
        return _STATE["module"], _STATE["reason"]
    with _LOCK:
        if _STATE["done"]:
            return _STATE["module"], _STATE["reason"]
        mod, why = None, None
        if os.environ.get("EDFKERN_NO_NATIVE", "0") not in ("", "0"):
            why = "EDFKERN_NO_NATIVE=1 set"
        else:
            mod = None if _build.sanitize() else _import_prebuilt()  # a wheel's build has no sanitizers
            if mod is None:
                why = _compiler_reason()
                if why is None:
                    try:
                        mod = _jit(verbose)
                    except Exception as e:  # noqa: BLE001  (any build error means: fall back)
                        why = f"build failed: {_short(e)}"
        _STATE.update(done=True, module=mod, reason=why)
        if mod is None and why != "EDFKERN_NO_NATIVE=1 set":  # once: later calls return above
            warnings.warn(f"edfkern: native extension unavailable ({why}); using the next backend",
                          RuntimeWarning, stacklevel=3)
        return mod, why


def reason() -> Optional[str]:
    """Why the native backend cannot run (None when it can); builds on first call."""
    return load()[1]


def has_cuda() -> bool:
    mod = load()[0]
    return bool(mod is not None and mod.with_cuda())
