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

The cache heals itself:

* **Lock.** A process builds or loads the cache only while it holds ``edfkern-build.lock`` there
  (``flock``: the kernel releases it when its holder dies, however it dies; the file, which stays,
  names the last holder's pid and host). A process that finds it held waits at most
  ``EDFKERN_BUILD_LOCK_TIMEOUT`` seconds (default 1800), then reports the backend unavailable,
  naming the holder. torch's own ``lock`` file, which a killed build leaves behind and which made
  every later ``load`` wait forever, is then removed once no process on this host holds it open
  (an older edfkern building) and no ninja or compiler of the killed build still runs in the
  directory (they are waited for, within the same bound; then the build runs again).
* **Integrity.** After each successful load the size and SHA-256 of the extension are recorded in
  ``edfkern-manifest.json``. Before loading, a cached ``.so`` whose size or hash differs from the
  record, or (with no record, e.g. a cache from an older edfkern) whose ELF headers point past its
  end, is deleted so that ninja relinks it; loading a truncated library would die of SIGBUS. When it
  cannot be deleted, the backend is unavailable with that reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import socket
import struct
import sys
import threading
import time
import warnings
from types import ModuleType
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]

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


# --------------------------------------------------------------------------- the cache: lock, integrity

LOCK_FILE = "edfkern-build.lock"  # ours: flock'd while a process builds or loads the cache
TORCH_LOCK_FILE = "lock"  # torch.utils.cpp_extension's FileBaton: O_EXCL file, no owner, waited on forever
MANIFEST_FILE = "edfkern-manifest.json"  # {"files": {"<name>.so": {"size": int, "sha256": str}}}
DEFAULT_LOCK_TIMEOUT_S = 1800.0
_POLL_S = 0.2
_QUIET_WAIT_S = 5.0  # say that we wait only past this: ranks starting together each hold the lock briefly


class CacheError(RuntimeError):
    """The cache cannot be used now; the message is the backend's reason."""


def lock_timeout() -> float:
    """``EDFKERN_BUILD_LOCK_TIMEOUT`` in seconds: finite and positive, else :class:`CacheError`."""
    raw = os.environ.get("EDFKERN_BUILD_LOCK_TIMEOUT", "")
    if not raw.strip():
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise CacheError(f"EDFKERN_BUILD_LOCK_TIMEOUT must be a finite number of seconds > 0, got {raw!r}")
    return value


@contextlib.contextmanager
def build_lock(bdir: str, timeout: float) -> Iterator[None]:
    """Hold ``bdir/edfkern-build.lock`` (``flock``), waiting at most ``timeout`` s for its holder.

    Where the lock file cannot be created (a read-only cache) or ``flock`` is not supported, the
    body runs without it, as before this lock existed.
    """
    path = os.path.join(bdir, LOCK_FILE)
    start = time.monotonic()
    told = False
    while True:
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            waited = time.monotonic() - start
            if waited > timeout:
                raise CacheError(f"{_lock_owner(path)} has held the build lock {path} for more than {timeout:g} s "
                                 "(EDFKERN_BUILD_LOCK_TIMEOUT)") from None
            if not told and waited > _QUIET_WAIT_S:  # a load holds it for a moment; a build for minutes
                print(f"edfkern: waiting for {_lock_owner(path)}, which is building the native extension in {bdir}",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(_POLL_S)
            continue
        except OSError:  # e.g. ENOLCK on some network file systems
            os.close(fd)
            yield
            return
        try:
            if _same_file(fd, path):  # not removed (e.g. build --force by hand) while we waited
                with contextlib.suppress(OSError):  # the holder's name is for messages only
                    os.ftruncate(fd, 0)
                    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                yield
                return
        finally:
            os.close(fd)  # releases the flock


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_owner(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read(200).strip()
    except OSError:
        text = ""
    return f"another process ({text})" if text else "another process"


def _proc_pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()]
    except OSError:  # no /proc (not Linux): nothing can be seen
        return []


# ninja runs the build in the build directory; these are the programs it starts there (``comm``, at
# most 15 characters). A shell or an editor open in the directory is not a build.
_BUILD_PROGRAMS = frozenset({"ninja", "c++", "g++", "gcc", "cc", "cc1plus", "cc1", "as", "collect2", "ld", "ld.bfd",
                             "ld.gold", "ld.lld", "clang", "clang++", "ccache", "sccache", "nvcc", "cicc", "ptxas",
                             "fatbinary", "nvlink", "cudafe++"})


def lock_users(bdir: str) -> list[int]:
    """Processes on this host still working on a build in ``bdir``: holders of torch's ``lock`` file
    (its builder keeps it open) and ninja or compilers running there (a killed builder's orphans)."""
    real = os.path.realpath(bdir)
    lock = os.path.join(real, TORCH_LOCK_FILE)
    cxx = os.path.basename(os.environ.get("CXX", "c++").split()[0])[:15]
    users = []
    for pid in _proc_pids():
        base = f"/proc/{pid}"
        try:
            if os.readlink(f"{base}/cwd") == real:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
                if comm in _BUILD_PROGRAMS or comm == cxx:
                    users.append(pid)
                    continue
            if any(os.readlink(f"{base}/fd/{fd}") == lock for fd in os.listdir(f"{base}/fd")):
                users.append(pid)
        except OSError:  # gone meanwhile, or another user's process
            continue
    return users


def clear_stale_torch_lock(bdir: str, deadline: float) -> None:
    """Remove torch's ``lock`` left by a killed build, once no process on this host uses it.

    Called with :func:`build_lock` held, so no other edfkern process is building here; a lock
    still used (an older edfkern building, a killed build's ninja finishing) is waited for, up to
    ``deadline`` (``time.monotonic()``), then :class:`CacheError`.
    """
    lock = os.path.join(bdir, TORCH_LOCK_FILE)
    told = False
    while os.path.exists(lock):
        users = lock_users(bdir)
        if users and not told:
            print(f"edfkern: waiting for process(es) {users}, still building in {bdir}", file=sys.stderr, flush=True)
            told = True
        if not users:
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            except OSError as e:  # e.g. a directory in its place
                raise CacheError(f"cannot remove the stale build lock {lock}: {e}") from e
            print(f"edfkern: removed {lock}, left by a build that was killed; building again",
                  file=sys.stderr, flush=True)
            return
        if time.monotonic() > deadline:
            raise CacheError(f"the build lock {lock} is still held by process(es) {users} after "
                             f"EDFKERN_BUILD_LOCK_TIMEOUT")
        time.sleep(_POLL_S)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(bdir: str) -> dict:
    try:
        with open(os.path.join(bdir, MANIFEST_FILE)) as f:
            files = json.load(f)["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: as if none
        return {}


def _write_manifest(bdir: str, files: dict) -> None:
    path = os.path.join(bdir, MANIFEST_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def record(so_path: str) -> None:
    """Record the size and hash of a freshly built or verified extension (best effort)."""
    bdir, name = os.path.split(so_path)
    files = _read_manifest(bdir)
    files[name] = {"size": os.path.getsize(so_path), "sha256": _sha256(so_path)}
    with contextlib.suppress(OSError):
        _write_manifest(bdir, files)


_ELF_HEADER = {1: ("HHIIIIIHHHHHH", 52), 2: ("HHIQQQIHHHHHH", 64)}  # ELFCLASS32/64, after e_ident
_ELF_PHDR = {1: ("IIIIIIII", 1, 4), 2: ("IIQQQQQQ", 2, 5)}  # format, index of p_offset and p_filesz


def elf_problem(path: str) -> Optional[str]:
    """Why an ELF shared library cannot be mapped whole (a table or segment past the end), or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in _ELF_HEADER or ident[5] not in (1, 2):
            return f"not an ELF file ({size} bytes)"
        end = "<" if ident[5] == 1 else ">"
        fmt, hsize = _ELF_HEADER[ident[4]]
        raw = f.read(hsize - 16)
        if len(raw) < hsize - 16:
            return f"truncated ELF header ({size} bytes)"
        (_, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = struct.unpack(end + fmt, raw)
        need = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
        if need > size:
            return f"{size} bytes, its header tables end at byte {need}"
        pfmt, i_off, i_filesz = _ELF_PHDR[ident[4]]
        if phnum and phentsize < struct.calcsize(pfmt):
            return f"bad ELF header (program header entries of {phentsize} bytes)"
        for k in range(phnum):
            f.seek(phoff + k * phentsize)
            ph = struct.unpack(end + pfmt, f.read(struct.calcsize(pfmt)))
            if ph[i_off] + ph[i_filesz] > size:
                return f"{size} bytes, a segment ends at byte {ph[i_off] + ph[i_filesz]}"
    return None


def check_cached(bdir: str) -> None:
    """Delete every cached ``.so`` in ``bdir`` that differs from its record, or, with no record, is
    not whole; ninja then relinks it. :class:`CacheError` when one cannot be deleted."""
    files = _read_manifest(bdir)
    changed = False
    for name in sorted(os.listdir(bdir)):
        path = os.path.join(bdir, name)
        if not name.endswith(".so") or not os.path.isfile(path):
            continue
        want = files.get(name)
        size = os.path.getsize(path)
        if isinstance(want, dict):
            if size != want.get("size"):
                problem = f"{size} bytes, {want.get('size')} recorded when it was built"
            elif _sha256(path) != want.get("sha256"):
                problem = "its SHA-256 differs from the one recorded when it was built"
            else:
                continue
        else:
            problem = elf_problem(path) if sys.platform.startswith("linux") else None
            if problem is None:
                continue
        try:
            os.remove(path)
        except OSError as e:
            raise CacheError(f"the cached extension {path} is damaged ({problem}) and cannot be removed: {e}") from e
        print(f"edfkern: the cached extension {path} is damaged ({problem}); rebuilding it",
              file=sys.stderr, flush=True)
        changed = files.pop(name, None) is not None or changed
    if changed:
        with contextlib.suppress(OSError):
            _write_manifest(bdir, files)


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
    timeout = lock_timeout()
    deadline = time.monotonic() + timeout
    os.makedirs(bdir, exist_ok=True)
    with build_lock(bdir, timeout):
        clear_stale_torch_lock(bdir, deadline)
        check_cached(bdir)
        if not any(f.endswith(".so") for f in os.listdir(bdir)):
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
        record(mod.__file__)
    sys.modules.setdefault("edfkern._C", mod)
    return mod


def clear_cache(with_cuda: Optional[bool] = None) -> str:
    """Delete the cached build (``python -m edfkern.build --force``), under the build lock; the lock
    file itself stays (a waiter holds it open). Returns the directory."""
    bdir = build_dir(with_cuda)
    if not os.path.isdir(bdir):
        return bdir
    with build_lock(bdir, lock_timeout()):
        for name in os.listdir(bdir):
            if name == LOCK_FILE:
                continue
            path = os.path.join(bdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
    return bdir


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
                    except CacheError as e:
                        why = str(e)
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
