"""The one place in edfkern that calls ``torch.distributed``.

Every collective edfkern issues goes through :func:`all_reduce_sum_` (or the other helpers
here), so that:

- a process group of ``None`` always means *one process* for the ops (today's behaviour);
- every collective is bounded by a timeout, and a rank that never arrives raises
  ``RuntimeError`` naming the collective instead of hanging;
- several tensors of one dtype travel in a single flat buffer (one collective, not one per tensor).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Iterator, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["collective_timeout", "is_active", "world", "default_group", "shard_classes",
           "all_reduce_sum_", "gather_ints", "CommStats", "record", "recorded",
           "last_call_stats"]

#: Upper bound on one collective when ``EDFKERN_DIST_TIMEOUT`` is unset or empty, in seconds.
TIMEOUT_DEFAULT_S = 300.0
#: The largest ``EDFKERN_DIST_TIMEOUT`` accepted (about 116 days): beyond it the value is a mistake.
TIMEOUT_MAX_S = 1e7


def collective_timeout() -> datetime.timedelta:
    """The bound on one collective: ``EDFKERN_DIST_TIMEOUT`` seconds (read at each use), else 300 s.

    Raises ``ValueError`` naming the variable unless it is a positive, finite number of seconds of at
    most :data:`TIMEOUT_MAX_S` (``abc``, ``0``, ``-5``, ``nan`` and ``inf`` are refused: ``0`` or
    ``inf`` would wait forever, a negative value would fail every collective at once).
    """
    raw = os.environ.get("EDFKERN_DIST_TIMEOUT", "").strip()
    if not raw:
        return datetime.timedelta(seconds=TIMEOUT_DEFAULT_S)
    try:
        s = float(raw)
    except ValueError:
        s = float("nan")
    if not (0 < s <= TIMEOUT_MAX_S):  # also False for nan
        raise ValueError(f"EDFKERN_DIST_TIMEOUT must be a positive, finite number of seconds of at most "
                         f"{TIMEOUT_MAX_S:g} (the bound on one collective), got {raw!r}")
    return datetime.timedelta(seconds=s)


def __getattr__(name: str):
    """``DEFAULT_TIMEOUT``: :func:`collective_timeout` at the time of the lookup (validated then, not at
    import, so a bad ``EDFKERN_DIST_TIMEOUT`` cannot break ``import edfkern``)."""
    if name == "DEFAULT_TIMEOUT":
        return collective_timeout()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_active(group: Optional[object]) -> bool:
    """True when ``group`` names a usable process group with more than zero peers."""
    return group is not None and dist.is_available() and dist.is_initialized()


def default_group() -> Optional[object]:
    """``WORLD`` under ``torchrun`` (an initialised default group), else ``None`` (one process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world(group: Optional[object]) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``; ``(0, 1)`` for ``None``."""
    if not is_active(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_classes(num_classes: int, *, group: Optional[object] = None) -> range:
    """The classes this rank owns: a contiguous, balanced block, identical on every run.

    Rank ``r`` of ``W`` gets ``[r*K//W, (r+1)*K//W)``; sizes differ by at most one. ``group=None``
    uses the default group when one is initialised (``torchrun``), else owns every class.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    rank, size = world(group if group is not None else default_group())
    return range(rank * num_classes // size, (rank + 1) * num_classes // size)


def _wait(work, what: str, timeout: datetime.timedelta) -> None:
    try:
        ok = work.wait(timeout)
    except RuntimeError as e:  # gloo raises on timeout / peer loss
        raise RuntimeError(f"edfkern.distributed: {what} did not complete within {timeout}: {e}") from e
    if ok is False:
        raise RuntimeError(f"edfkern.distributed: {what} did not complete within {timeout}")


@dataclass
class CommStats:
    """What the collectives of one block cost *this* rank: ``calls`` collectives, ``bytes`` of
    payload handed to them (the reduced buffers; a ring all-reduce puts about ``2 (W-1)/W`` times that
    on the wire per rank), and ``seconds`` spent waiting for them."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


_RECORDERS: list[CommStats] = []


@contextlib.contextmanager
def record() -> Iterator[CommStats]:
    """``with record() as st: ...`` adds every collective issued inside the block to ``st``."""
    st = CommStats()
    _RECORDERS.append(st)
    try:
        yield st
    finally:
        _RECORDERS.remove(st)


_LAST: dict[str, CommStats] = {}


def recorded(fn):
    """Decorator of a distributed op: its collectives (header included) become :func:`last_call_stats`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record() as st:
            out = fn(*args, **kwargs)
        _LAST[fn.__name__] = st
        return out

    return wrapper


def last_call_stats(op: str) -> CommStats:
    """Collectives, payload bytes and seconds of the last call of distributed ``op`` on this rank
    (e.g. ``"cpd_trajectory_loss"``). Backward issues none."""
    if op not in _LAST:
        raise KeyError(f"{op!r} has not been called with a process group in this process")
    return _LAST[op]


def _account(nbytes: int, seconds: float) -> None:
    for st in _RECORDERS:
        st.calls += 1
        st.bytes += nbytes
        st.seconds += seconds


def all_reduce_sum_(tensors: Sequence[Tensor], *, group: Optional[object],
                    timeout: Optional[datetime.timedelta] = None, what: str = "all_reduce") -> list[Tensor]:
    """Sum ``tensors`` over ``group`` in place, as one collective per dtype; returns them.

    With ``group=None`` (or no initialised process group) this is the identity.
    """
    tensors = list(tensors)
    if not is_active(group) or not tensors:
        return tensors
    timeout = timeout or collective_timeout()
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        idx = by_dtype[dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]) if len(idx) > 1 else tensors[idx[0]].reshape(-1).clone()
        t0 = time.perf_counter()
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        _wait(work, f"{what} ({dtype}, {flat.numel()} elements)", timeout)
        _account(flat.numel() * flat.element_size(), time.perf_counter() - t0)
        off = 0
        for i in idx:
            n = tensors[i].numel()
            tensors[i].copy_(flat[off:off + n].view_as(tensors[i]))
            off += n
    return tensors


def shutdown(*, timeout: Optional[datetime.timedelta] = None) -> None:
    """End this process's part in the default process group: a bounded barrier, then
    ``destroy_process_group``. The barrier keeps a rank from closing its connections while a peer is
    still finishing the last collective (gloo then dies in a background thread with "terminate called
    without an active exception"). A no-op when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    global _SHUT_DOWN
    try:
        all_reduce_sum_([torch.zeros(1)] if dist.get_backend() == "gloo" else
                        [torch.zeros(1, device="cuda")], group=dist.group.WORLD, timeout=timeout,
                        what="shutdown barrier")
    finally:
        dist.destroy_process_group()
        _SHUT_DOWN = True


_SHUT_DOWN = False


def exit_process(code: int = 0) -> NoReturn:
    """The last call of a launched script (``torchrun``, a spawned worker): exit with ``code``.

    After :func:`shutdown` this flushes stdout and stderr and leaves with ``os._exit``, skipping the
    interpreter's finalization: on torch 2.13 with gloo, a process that has finished every
    collective and destroyed its process group still aborts in finalization now and then ("terminate
    called without an active exception", exit -6; about 1 run in 5 of a 3-rank CPU world here, with
    edfkern's native backend off too), which would make a
    finished run look failed. Without a shut-down process group it is ``sys.exit(code)``.
    """
    import sys

    if not _SHUT_DOWN:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a closed stream must not keep the process alive)
            pass
    os._exit(int(code))


def gather_ints(values: Sequence[int], *, group: Optional[object], device: Optional[torch.device] = None,
                timeout: Optional[datetime.timedelta] = None, what: str = "header") -> list[list[int]]:
    """Every rank's list of ``F`` integers, in rank order (``W`` rows): one all-reduce of a ``(W, F)``
    int64 table in which each rank fills its own row. With one process: ``[list(values)]``.

    This is how the ops agree on shapes, dtypes and flags *before* the data collectives, so that every
    rank sees the same table and raises the same ``ValueError`` together.
    """
    rank, size = world(group)
    row = [int(v) for v in values]
    if not is_active(group):
        return [row]
    buf = torch.zeros(size, len(row), dtype=torch.int64, device=device)
    buf[rank] = torch.tensor(row, dtype=torch.int64)
    all_reduce_sum_([buf], group=group, timeout=timeout, what=what)
    return buf.tolist()
