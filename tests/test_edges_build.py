"""Issue 20, class 3: the just-in-time build cache can neither wedge nor crash the process.

* A build killed mid-compile (``os.kill`` of the PID this test started, alone or with its process
  group) leaves torch's ``lock`` file; the next import used to wait on it forever. It must now
  rebuild and load within a bound.
* A truncated or altered cached ``edfkern_C.so`` used to kill the next import with SIGBUS (or make the
  backend unavailable for good, "file too short"). It must now be relinked, or the backend reported
  unavailable with the reason.
* A live holder of the lock bounds the wait (``EDFKERN_BUILD_LOCK_TIMEOUT``) and is named.

Every import runs in a subprocess of its own session with a timeout, so a hang fails the test and a
signal shows as a negative return code. To keep CI time small, no case builds from scratch: each
works on a copy of one built cache (the test session's, or one built here if the session has none),
and the kill cases delete one object file so the killed and the healing build compile one unit.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Callable, Optional
from unittest import mock

import pytest

from edfkern import _extension

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cache checks read /proc and ELF")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_BOUND_S = 180  # a load from an intact (or relinked) cache, with torch's import, on a loaded 2-core machine
REBUILD_BOUND_S = 900  # one translation unit compiled (twice in the worst case) and linked

LOAD = """
    import os, time
    t0 = time.time()
    import torch
    from edfkern import _extension, reference
    mod, why = _extension.load()
    print("AVAILABLE", mod is not None)
    print("REASON", why)
    print("SECONDS", round(time.time() - t0, 1))
    if mod is not None:  # the covariance unit is the one the kill cases recompile
        print("DIR", os.path.dirname(mod.__file__))
        x, offsets = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 6])
        pairs = zip(mod.cov_forward(x, None, offsets), reference.cov_forward(x, None, offsets))
        print("AGREE", all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in pairs))
"""


class Run:
    """A finished subprocess: return code (negative: killed by that signal), parsed stdout, stderr."""

    def __init__(self, rc: int, out: str, err: str, seconds: float) -> None:
        self.rc, self.err, self.seconds = rc, err, seconds
        self.d = dict(line.split(" ", 1) for line in out.strip().splitlines() if " " in line)

    def __repr__(self) -> str:
        return f"rc={self.rc} in {self.seconds:.0f} s, stdout={self.d}, stderr tail={self.err[-1500:]!r}"

    @property
    def available(self) -> bool:
        return self.rc == 0 and self.d.get("AVAILABLE") == "True" and self.d.get("AGREE") == "True"


def _env(ext_root: str, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("EDFKERN_NO_NATIVE", None)
    env.pop("EDFKERN_BUILD_LOCK_TIMEOUT", None)
    env.update(TORCH_EXTENSIONS_DIR=ext_root, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _start(ext_root: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOAD)], env=_env(ext_root, **extra), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, bound: float, t0: float) -> Run:
    try:
        out, err = proc.communicate(timeout=max(1.0, bound - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"the import hung: still running after {bound} s (stderr: {err[-1500:]!r})")
    return Run(proc.returncode, out, err, time.monotonic() - t0)


def _load(ext_root: str, bound: float = IMPORT_BOUND_S, **extra: str) -> Run:
    t0 = time.monotonic()
    return _finish(_start(ext_root, **extra), bound, t0)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the session this test started (the child and whatever it left running)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- one built cache, copied


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    """A built cache directory for this checkout: the session's, or one built here (minutes)."""
    why = _extension._compiler_reason()
    if why is not None:
        pytest.skip(f"the just-in-time build needs a compiler and ninja: {why}")
    _cache_name()
    mod, _ = _extension.load()
    if mod is not None and os.path.dirname(mod.__file__) == _extension.build_dir():
        return _extension.build_dir()
    r = _load(str(tmp_path_factory.mktemp("seed")), bound=3600)
    assert r.available, f"could not build the extension to test its cache: {r}"
    return r.d["DIR"]


def _copy(built: str, ext_root: str, manifest: bool = True) -> str:
    """A copy of ``built`` where a subprocess with ``TORCH_EXTENSIONS_DIR=ext_root`` looks for it
    (mtimes kept, so ninja finds it up to date); with or without a size-and-hash record."""
    bdir = os.path.join(ext_root, _cache_name())
    shutil.copytree(built, bdir, ignore=shutil.ignore_patterns(_extension.TORCH_LOCK_FILE, _extension.LOCK_FILE,
                                                               _extension.MANIFEST_FILE, "*.tmp"))
    if manifest:
        _extension.record(_so(bdir))
    return bdir


@functools.lru_cache(maxsize=None)
def _cache_name() -> str:
    """The name of the cache directory under ``TORCH_EXTENSIONS_DIR`` (first called from the main
    thread, by ``built``: the environment is patched only there, never from the worker threads)."""
    with mock.patch.dict(os.environ, {"TORCH_EXTENSIONS_DIR": os.sep}):
        return os.path.basename(_extension.build_dir())


def _so(bdir: str) -> str:
    (name,) = [f for f in os.listdir(bdir) if f.endswith(".so")]
    return os.path.join(bdir, name)


# --------------------------------------------------------------------------- stale and live locks


def test_a_stale_build_lock_is_removed(built, tmp_path):
    """torch's ``lock`` with no process behind it (what a killed build leaves): removed, then load."""
    ext = str(tmp_path / "ext")
    bdir = _copy(built, ext)
    open(os.path.join(bdir, _extension.TORCH_LOCK_FILE), "w").close()
    r = _load(ext)
    assert r.available, r
    assert "left by a build that was killed" in r.err, r
    assert not os.path.exists(os.path.join(bdir, _extension.TORCH_LOCK_FILE))


def test_a_live_lock_holder_bounds_the_wait_and_is_named(built, tmp_path):
    """While this process holds the edfkern lock, or torch's ``lock`` open as an older edfkern
    building would, an import waits ``EDFKERN_BUILD_LOCK_TIMEOUT`` s and reports who holds it; once
    the holder is gone the same cache loads."""
    import fcntl

    ext = str(tmp_path / "ext")
    bdir = _copy(built, ext)
    me = str(os.getpid())

    fd = os.open(os.path.join(bdir, _extension.LOCK_FILE), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"pid {me} on this-test\n".encode())
        r = _load(ext, EDFKERN_BUILD_LOCK_TIMEOUT="1")
    finally:
        os.close(fd)
    assert r.rc == 0 and r.d["AVAILABLE"] == "False", r
    assert f"pid {me}" in r.d["REASON"] and "EDFKERN_BUILD_LOCK_TIMEOUT" in r.d["REASON"], r

    torch_lock = os.path.join(bdir, _extension.TORCH_LOCK_FILE)
    fd = os.open(torch_lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while building
    try:
        r = _load(ext, EDFKERN_BUILD_LOCK_TIMEOUT="1")
    finally:
        os.close(fd)
    assert r.rc == 0 and r.d["AVAILABLE"] == "False", r
    assert torch_lock in r.d["REASON"] and me in r.d["REASON"], r

    r = _load(ext)  # the holder is gone and its lock file stays: stale now
    assert r.available and "left by a build that was killed" in r.err, r


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "1e400"])
def test_lock_timeout_must_be_a_positive_finite_number(monkeypatch, value):
    monkeypatch.setenv("EDFKERN_BUILD_LOCK_TIMEOUT", value)
    with pytest.raises(_extension.CacheError, match=r"EDFKERN_BUILD_LOCK_TIMEOUT must be .*" + re.escape(repr(value))):
        _extension.lock_timeout()


def test_lock_timeout_default_and_value(monkeypatch):
    monkeypatch.delenv("EDFKERN_BUILD_LOCK_TIMEOUT", raising=False)
    assert _extension.lock_timeout() == _extension.DEFAULT_LOCK_TIMEOUT_S
    monkeypatch.setenv("EDFKERN_BUILD_LOCK_TIMEOUT", " 2.5 ")
    assert _extension.lock_timeout() == 2.5


# --------------------------------------------------------------------------- damaged cached library


def _truncate(size: Callable[[int], int]) -> Callable[[str], None]:
    def damage(so: str) -> None:
        with open(so, "r+b") as f:
            f.truncate(size(os.path.getsize(so)))
    return damage


def _flip_middle(so: str) -> None:
    """Same size, 4 KiB of the middle (code) inverted: only the recorded hash can tell."""
    with open(so, "r+b") as f:
        mid = os.path.getsize(so) // 2
        f.seek(mid)
        chunk = f.read(4096)
        f.seek(mid)
        f.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE: dict[str, tuple[Optional[Callable[[str], None]], bool]] = {  # name: (damage, size-and-hash record kept)
    "empty": (_truncate(lambda n: 0), True),
    "half": (_truncate(lambda n: n // 2), True),
    "one_byte_short": (_truncate(lambda n: n - 1), True),
    "same_size_altered": (_flip_middle, True),
    "half_no_record": (_truncate(lambda n: n // 2), False),  # a cache built before the record existed
    "intact_no_record": (None, False),
}


@pytest.fixture(scope="module")
def damaged_runs(built, tmp_path_factory) -> dict[str, tuple[Run, str]]:
    """Each damage on its own copy, then an import of it; two at a time (each relinks)."""
    def one(name: str) -> tuple[Run, str]:
        damage, keep_record = DAMAGE[name]
        ext = str(tmp_path_factory.mktemp(name) / "ext")
        bdir = _copy(built, ext, manifest=keep_record)
        if damage is not None:
            damage(_so(bdir))
        return _load(ext), bdir

    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        futs = {name: ex.submit(one, name) for name in DAMAGE}
        return {name: f.result() for name, f in futs.items()}


@pytest.mark.parametrize("name", [n for n in DAMAGE if DAMAGE[n][0] is not None])
def test_a_damaged_cached_library_is_relinked(damaged_runs, name):
    r, bdir = damaged_runs[name]
    assert r.rc >= 0, f"the import died of signal {-r.rc}: {r}"
    assert r.available, r
    assert "is damaged" in r.err, r
    assert _extension._read_manifest(bdir)[os.path.basename(_so(bdir))]["size"] == os.path.getsize(_so(bdir))
    _extension.check_cached(bdir)  # the relinked library matches its new record
    assert os.path.exists(_so(bdir))


def test_an_intact_cache_without_a_record_loads_and_gets_one(damaged_runs):
    r, bdir = damaged_runs["intact_no_record"]
    assert r.available and "is damaged" not in r.err and "compiling" not in r.err, r
    rec = _extension._read_manifest(bdir)[os.path.basename(_so(bdir))]
    assert rec["size"] == os.path.getsize(_so(bdir)) and rec["sha256"] == _extension._sha256(_so(bdir))


def test_elf_check_finds_every_truncation(built, tmp_path):
    so = _so(built)
    assert _extension.elf_problem(so) is None
    n = os.path.getsize(so)
    for size in sorted({0, 1, 15, 16, 63, 64, 200, n // 3, n // 2, n - 4096, n - 1}):
        cut = tmp_path / f"cut{size}.so"
        with open(so, "rb") as src, open(cut, "wb") as dst:
            dst.write(src.read(size))
        assert _extension.elf_problem(str(cut)) is not None, f"{size} of {n} bytes passed the ELF check"


def test_a_damaged_library_that_cannot_be_removed_makes_the_backend_unavailable(built, tmp_path, monkeypatch):
    bdir = _copy(built, str(tmp_path / "ext"))
    _truncate(lambda n: n // 2)(_so(bdir))

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_extension.os, "remove", refuse)
    with pytest.raises(_extension.CacheError, match=r"is damaged \(.*\) and cannot be removed: .*Permission denied"):
        _extension.check_cached(bdir)

    # and load() turns it into the backend's reason, with one warning, instead of a crash
    monkeypatch.setattr(_extension, "_jit", lambda verbose: _extension.check_cached(bdir))
    monkeypatch.setattr(_extension, "_import_prebuilt", lambda: None)
    monkeypatch.setitem(_extension._STATE, "done", False)
    monkeypatch.setitem(_extension._STATE, "module", None)
    monkeypatch.setitem(_extension._STATE, "reason", None)
    monkeypatch.delenv("EDFKERN_NO_NATIVE", raising=False)
    with pytest.warns(RuntimeWarning, match="cannot be removed"):
        mod, why = _extension.load()
    assert mod is None and "cannot be removed" in why


def test_clear_cache_keeps_the_lock_file(built, tmp_path, monkeypatch):
    """``python -m edfkern.build --force`` empties the cache under the lock, whose file stays."""
    ext = str(tmp_path / "ext")
    bdir = _copy(built, ext)
    open(os.path.join(bdir, _extension.LOCK_FILE), "w").close()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", ext)
    assert _extension.clear_cache() == bdir
    assert os.listdir(bdir) == [_extension.LOCK_FILE]


# --------------------------------------------------------------------------- a build killed mid-compile


def _compiling_in(bdir: str) -> bool:
    """Whether a compiler proper (cc1plus) runs with ``bdir`` as its working directory."""
    real = os.path.realpath(bdir)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{d}/cwd") == real and open(f"/proc/{d}/comm").read().strip() == "cc1plus":
                return True
        except OSError:
            continue
    return False


def _kill_builds_in(bdir: str) -> None:
    """SIGKILL what is left of this test's builds: the processes working in its own ``bdir`` (ninja
    starts each compiler in a process group of its own, so killing the session misses them)."""
    real = os.path.realpath(bdir)
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/cwd") == real:
                os.kill(int(d), signal.SIGKILL)
        except OSError:
            continue


def _kill_mid_compile(built: str, ext: str, whole_group: bool) -> tuple[Run, str, float]:
    """Copy the cache without one kernel's object and the library, start an import (it compiles that
    unit), SIGKILL it once the compiler runs, then import again: ``(second run, bdir, seconds to kill)``."""
    bdir = _copy(built, ext)
    os.remove(os.path.join(bdir, "covariance.o"))  # one CPU kernel: the import compiles it alone
    os.remove(_so(bdir))
    t0 = time.monotonic()
    first = _start(ext)
    try:
        while not _compiling_in(bdir):
            assert first.poll() is None, f"the first build ended before it could be killed: {first.communicate()}"
            assert time.monotonic() - t0 < REBUILD_BOUND_S, "the first build never started compiling"
            time.sleep(0.05)
        assert os.path.exists(os.path.join(bdir, _extension.TORCH_LOCK_FILE))
        if whole_group:
            os.killpg(first.pid, signal.SIGKILL)
        else:
            os.kill(first.pid, signal.SIGKILL)  # its ninja and compiler keep running, orphaned
        first.wait()
        killed_after = time.monotonic() - t0
        assert first.returncode == -signal.SIGKILL
        return _load(ext, bound=REBUILD_BOUND_S), bdir, killed_after
    finally:
        _kill_group(first)  # whatever of the first build is left
        _kill_builds_in(bdir)


@pytest.fixture(scope="module")
def killed_runs(built, tmp_path_factory) -> dict[str, tuple[Run, str, float]]:
    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        futs = {how: ex.submit(_kill_mid_compile, built, str(tmp_path_factory.mktemp(how) / "ext"), how == "group")
                for how in ("pid", "group")}
        return {how: f.result() for how, f in futs.items()}


@pytest.mark.parametrize("how", ["pid", "group"])
def test_a_build_killed_mid_compile_is_rebuilt(killed_runs, how):
    """``pid``: ``os.kill`` of the importing process only (the literal report: before, the next import
    waited forever on the lock); its ninja and compiler go on, orphaned. ``group``: ``os.killpg`` of
    the session it leads, ninja included; the compiler ninja started (a process group of its own)
    goes on. Either way the next import waits for the orphans, removes the lock and builds."""
    r, bdir, _ = killed_runs[how]
    assert r.available, r
    assert "left by a build that was killed" in r.err, r
    assert not os.path.exists(os.path.join(bdir, _extension.TORCH_LOCK_FILE))
    _extension.check_cached(bdir)
    assert os.path.exists(_so(bdir))
