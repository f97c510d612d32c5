"""Workspace memory: the peak an op needs above the inputs, outputs and gradients it must hold.

CUDA
    ``torch.cuda.max_memory_allocated()`` around the call, minus what was allocated
    before it (inputs, and for ``bwd`` the retained graph), minus the outputs and
    ``.grad`` tensors the call hands back.

CPU
    Peak resident set size (``VmHWM`` in ``/proc/self/status``) in a **fresh child
    process**, minus the resident set after the inputs were allocated, minus the
    outputs and gradients. A child is needed because the high-water mark of a long-lived
    process remembers every earlier op and the heap keeps freed pages resident. Inside the
    child, before the measured call: a tiny warm-up run of the same case (so lazily
    loaded kernels and thread pools are not charged to the op), ``malloc_trim(0)`` (so
    freed heap pages are handed back and cannot hide new ones), and a reset of the
    high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) so the temporaries
    of input generation do not count. Where the reset is refused a sampling thread
    polls ``VmRSS`` instead (coarser; the result says which method ran).

Children come from a ``multiprocessing`` *forkserver* that has imported torch and
edfkern once (``spawn`` where there is no forkserver): every case still runs in a clean
process that has run nothing else, without paying a torch import per case.

:func:`run_tasks` is the one runner of both command-line modes: each task in its own child
(or in this process), under ``--timeout``, a progress bar, and optionally a
:class:`Watchdog` that kills a child whose resident set passes a limit.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

__all__ = ["MemoryResult", "available_bytes", "rss_bytes", "peak_rss_bytes", "reset_peak_rss", "trim_heap",
           "measure_call", "run_isolated", "Watchdog", "run_tasks"]

_STATUS = "/proc/self/status"


def _status_kb(key: str) -> Optional[int]:
    try:
        with open(_STATUS) as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> Optional[int]:
    """Current resident set size (``VmRSS``), or None where /proc is missing."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Sampler:
    """Fallback peak tracker: polls VmRSS every ``period`` seconds on a thread."""

    def __init__(self, period: float = 2e-4):
        self.period, self.peak, self._stop = period, rss_bytes() or 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes() or 0)


@dataclass
class MemoryResult:
    workspace: int       # bytes above inputs, outputs and grads (clamped at 0)
    footprint: int       # bytes above the process before the inputs existed: inputs + outputs + workspace
    held: int            # outputs + grads the op must hand back
    method: str          # "cuda-max-allocated", "vmhwm", "vmrss-sampling" or "unavailable"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def usage_before(device: str) -> int:
    """Memory in use now, as the zero of a peak measurement: ``memory_allocated`` on CUDA (after a
    sync), this process's resident set on CPU (0 where /proc is unavailable)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return rss_bytes() or 0


def measure_call(fn: Callable[[], Any], held: Callable[[Any], int], *, device: str, before_inputs: int = 0,
                 reset: Optional[Callable[[], None]] = None) -> tuple[MemoryResult, Any]:
    """Run ``fn()`` once and measure its workspace; returns (result, fn's output).

    ``before_inputs``: the RSS / allocated bytes before the inputs were built (for ``footprint``).
    ``reset``: run (unmeasured) before the call.
    """
    if reset is not None:
        reset()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        h = held(out)
        return MemoryResult(max(0, peak - base - h), max(0, peak - before_inputs), h, "cuda-max-allocated"), out
    trim_heap()
    base = rss_bytes()
    if base is None:
        out = fn()
        return MemoryResult(0, 0, held(out), "unavailable"), out
    if reset_peak_rss():
        out = fn()
        peak, method = peak_rss_bytes() or 0, "vmhwm"
    else:
        with _Sampler() as s:
            out = fn()
        peak, method = s.peak, "vmrss-sampling"
    h = held(out)
    return MemoryResult(max(0, peak - base - h), max(0, peak - before_inputs), h, method), out


# ----------------------------------------------------------------------------- child processes

_CTX: Optional[mp.context.BaseContext] = None


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            # import torch and edfkern once in the server; children fork from it clean
            ctx.set_forkserver_preload(["torch", "edfkern", "edfkern.bench.runner", "edfkern.native"])
        else:
            ctx = mp.get_context("spawn")
        _CTX = ctx
    return _CTX


def _child(conn, target: Callable[[Any], Any], arg: Any) -> None:
    try:
        conn.send(("ok", target(arg)))
    except BaseException as e:  # report, never hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
    finally:
        conn.close()


def run_isolated(target: Callable[[Any], Any], arg: Any, *, timeout: float = 900.0) -> Any:
    """``target(arg)`` in a fresh child process; returns its result or raises RuntimeError.

    ``target`` must be a module-level function (it is pickled by reference).
    """
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, target, arg), daemon=True)
    p.start()
    child.close()
    try:
        if not parent.poll(timeout):
            p.kill()
            raise RuntimeError(f"timed out after {timeout:.0f} s")
        status, value = parent.recv()
    except EOFError:
        p.join(5)
        raise RuntimeError(f"child process died (exit code {p.exitcode}; out of memory?)") from None
    finally:
        parent.close()
        p.join(10)
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(value)
    return value


def available_bytes() -> Optional[int]:
    """``MemAvailable`` of /proc/meminfo, or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# ----------------------------------------------------------------------------- watchdog and the task runner


def _descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (read from /proc; empty where /proc is missing)."""
    parent: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        out.extend(kids)
        frontier.extend(kids)
    return out


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class Watchdog:
    """Kills (SIGKILL) any descendant process of this one whose resident set passes ``limit`` bytes.

    Only processes this process started (directly or through the multiprocessing forkserver) are
    looked at. ``killed`` lists ``(pid, rss)`` of what it killed.
    """

    def __init__(self, limit: int, period: float = 0.25) -> None:
        self.limit, self.period = limit, period
        self.killed: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.period):
            for pid in _descendants(me):
                rss = _rss_of(pid)
                if rss > self.limit:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append((pid, rss))
                    except OSError:
                        pass

    def __enter__(self) -> "Watchdog":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def run_tasks(tasks: Iterable[dict], target: Callable[[dict], Any], *, timeout: float, isolate: bool = True,
              limit: Optional[int] = None, desc: str = "edfkern.bench", label: Callable[[dict], str] = str,
              skip: Callable[[dict], bool] = lambda task: False) -> Iterator[tuple[dict, Any, Optional[str]]]:
    """Run ``target(task)`` for each task, in order; yields ``(task, result, None)`` or ``(task, None, reason)``.

    ``isolate``: each task in a fresh child (:func:`run_isolated`, killed after ``timeout``
    seconds), else in this process. ``limit``: a :class:`Watchdog` kills any child whose
    resident set passes that many bytes (the reason says so). ``skip(task)``, asked just before a
    task runs, passes over it (nothing is yielded). A tqdm bar on stderr shows ``label(task)``.
    """
    tasks = list(tasks)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc=desc, unit="case", file=sys.stderr, leave=False, dynamic_ncols=True,
                   mininterval=0)
    except ImportError:
        bar = None
    dog = Watchdog(limit) if limit is not None else None
    try:
        if dog is not None:
            dog.__enter__()
        for task in tasks:
            if bar is not None:
                bar.set_postfix_str(label(task))
            if not skip(task):
                n_killed = len(dog.killed) if dog is not None else 0
                try:
                    res = run_isolated(target, task, timeout=timeout) if isolate else target(task)
                except Exception as e:
                    why = _first_line(e)
                    if dog is not None and len(dog.killed) > n_killed:
                        why = (f"killed by the watchdog: resident set {dog.killed[-1][1] / 2 ** 20:.0f} MB passed "
                               f"the limit {limit / 2 ** 20:.0f} MB")
                    yield task, None, why
                else:
                    yield task, res, None
            if bar is not None:
                bar.update(1)
    finally:
        if dog is not None:
            dog.__exit__(None, None, None)
        if bar is not None:
            bar.close()
