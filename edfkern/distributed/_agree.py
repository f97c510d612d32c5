"""How the ranks agree on an op call before any data moves: which op, which call, whose input is bad.

Every distributed op is wrapped by :func:`collective_op`. A call of it with an active process group
exchanges exactly one *header* before any data collective: one all-reduce of a ``(W, 32)`` int64
table (:func:`edfkern.distributed._comm.gather_ints`) in which each rank fills its own row. The table
has the same size for every op, so ranks that call different ops still pair their headers (instead
of handing gloo buffers of different sizes, which aborts the process). A row holds:

=======  ==========================================================================================
words    meaning
=======  ==========================================================================================
0        :data:`MAGIC` (this protocol and its version)
1-4      the op's name, 32 bytes of ASCII (its identity)
5        the call counter: how many edfkern op calls this rank had started on this group before
6        status: 0, or the kind of exception (ValueError, TypeError, other) the op's local checks
         raised on this rank
7        the byte length of that exception's message
8-31     the op's own words (:data:`PAYLOAD_WORDS`): dtypes, row counts, shapes, groups, label
         ranges, scalar arguments (see :func:`agree` and ``cpd._agree_chunks``)
=======  ==========================================================================================

Every rank runs the same checks on the same table, in this order, so they all raise together:

1. *out of step*: the counters differ. A rank started a call that never sent its header (an
   exception outside the op's checks, ``KeyboardInterrupt``, a call made on some ranks only). The
   ranks behind raise ``ValueError`` and so drop this call; the ranks ahead exchange their header
   again, so their call pairs with the others' next call. Every rank has then lost the same call
   and the later calls pair up correctly;
2. *different ops*: the names differ; ``ValueError`` naming every rank's op;
3. *a local check failed*: everything an op raises before its header (type and shape checks,
   ``drop_ratio``, ``weight``, labels of the wrong dtype, even a missing argument) is caught by the
   wrapper and sent in the header. One more collective (only then) carries the messages, and every
   rank raises the same exception type naming the rank and its message. No rank goes on alone, so
   the counters stay aligned;
4. the op's own checks on its words (:func:`agree`: shapes, dtypes, ``K``, label ranges, scalars).

After the header an op may only raise on what every rank sees alike (the table, reduced data): any
check that can fail on one rank only belongs before the header.

A new op registers its identity by its wrapper (the recipe is also in ``docs/distributed.md``)::

    @collective_op("trajectory_matching_loss")       # at most 32 ASCII characters
    def trajectory_matching_loss(..., process_group=None):
        ...every local check...                      # raises -> every rank raises
        table = exchange([n_steps, float_bits(lr)])  # the header; one row of words per rank
        ...                                          # then the data collectives (all_reduce_sum_)

or, without a decorator, ``with op_call("trajectory_matching_loss", group) as call: ... call.exchange(words)``.
"""
from __future__ import annotations

import contextvars
import datetime
import functools
import inspect
import struct
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks as C
from . import _comm

__all__ = ["collective_op", "op_call", "exchange", "agree", "Side", "float_bits", "bits_float", "same",
           "HEADER_WORDS", "PAYLOAD_WORDS", "HEADER_BYTES_PER_RANK"]

_DTYPE_CODE = {dt: i for i, dt in enumerate(C.FLOAT_DTYPES)}

HEADER_WORDS = 32  #: int64 words per rank in every header, whatever the op
_PREFIX = 8  # magic, name (4 words), counter, status, message length
PAYLOAD_WORDS = HEADER_WORDS - _PREFIX  #: words an op may put in its header
HEADER_BYTES_PER_RANK = 8 * HEADER_WORDS  #: payload bytes of the header, per rank of the world
MAGIC = 0x4544464B_4844_0002  #: "EDFK" "HD", protocol version 2
_NAME_BYTES = 32
_MAX_MESSAGE = 1000  # bytes of a local error's message that travel to the other ranks
_INT64 = (-(1 << 63), (1 << 63) - 1)
_KINDS = {1: ValueError, 2: TypeError, 3: RuntimeError}


def float_bits(v: float) -> int:
    """The float64 bit pattern of ``v`` as an int (so a float argument can ride in the int table)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def bits_float(b: int) -> float:
    """The inverse of :func:`float_bits`."""
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def _name_words(op: str) -> list[int]:
    raw = op.encode("ascii").ljust(_NAME_BYTES, b"\0")
    return list(struct.unpack("<4q", raw))


def _name_of(words: Sequence[int]) -> str:
    try:
        return struct.pack("<4q", *words).rstrip(b"\0").decode("ascii")
    except (UnicodeDecodeError, struct.error):
        return f"<not an edfkern op: {list(words)}>"


def _check_op_name(op: str) -> str:
    if not isinstance(op, str) or not op or not op.isascii() or len(op) > _NAME_BYTES:
        raise ValueError(f"an edfkern collective op name must be 1 to {_NAME_BYTES} ASCII characters, got {op!r}")
    return op


def _kind(e: BaseException) -> int:
    return 1 if isinstance(e, ValueError) else 2 if isinstance(e, TypeError) else 3


def _agreed(e: Exception) -> Exception:
    """Mark ``e`` as raised on every rank alike: an enclosing op call must not send it again."""
    e._edfkern_agreed = True  # type: ignore[attr-defined]
    return e


def _header_device(group) -> torch.device:
    """Headers travel on the CPU for gloo (and mixed backends), on the current GPU for NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


# ----------------------------------------------------------------------------- one call of an op

#: Per process group: how many edfkern op calls this rank has started on it (the header's counter).
_COUNTERS: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_CURRENT: contextvars.ContextVar[Optional["op_call"]] = contextvars.ContextVar("edfkern_op_call", default=None)


class op_call:
    """``with op_call(op, group) as call:`` one call of a distributed op on ``group``.

    Inside the block the op runs its local checks, then :meth:`exchange` (or :func:`exchange`, or
    :func:`agree`) sends its header. An ``Exception`` raised in the block *before* the header is sent
    in it instead, and every rank raises. With ``group`` inactive (``None``, or no initialised
    process group) nothing is exchanged: :meth:`exchange` returns this rank's row only.
    """

    def __init__(self, op: str, group) -> None:
        self.op, self.group = _check_op_name(op), group
        self.active = _comm.is_active(group)
        self.exchanged = False
        self.counter = 0

    def __enter__(self) -> "op_call":
        if self.active:
            self.counter = _COUNTERS.get(self.group, 0)
            _COUNTERS[self.group] = self.counter + 1
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, et, ev, tb) -> bool:
        _CURRENT.reset(self._token)
        if not self.active or self.exchanged:
            return False
        if ev is None:
            raise RuntimeError(f"edfkern.distributed: {self.op} returned without exchanging its header; "
                               "every call of a collective op must call exchange() or agree() once")
        if isinstance(ev, Exception) and not getattr(ev, "_edfkern_agreed", False):
            self._send([], failure=ev)  # raises the agreed error
        return False  # BaseException (KeyboardInterrupt): leave now; the counters catch the gap later

    def exchange(self, words: Sequence[int]) -> list[list[int]]:
        """Send this rank's ``words`` (at most :data:`PAYLOAD_WORDS` ints) in the header; every rank's
        words in rank order. Raises the same ``ValueError`` (or the local error's type) on every rank
        when the ranks are out of step, call different ops, or a rank's local checks failed."""
        if self.exchanged:
            raise RuntimeError(f"edfkern.distributed: {self.op} exchanged its header twice in one call")
        words = [int(w) for w in words]
        if not self.active:
            self.exchanged = True
            return [words]
        failure: Optional[Exception] = None
        if len(words) > PAYLOAD_WORDS:
            failure = ValueError(f"{self.op}: {len(words)} header words, more than {PAYLOAD_WORDS}")
        elif any(not _INT64[0] <= w <= _INT64[1] for w in words):
            failure = ValueError(f"{self.op}: an argument is too large for the header (beyond int64): {words}")
        return self._send([] if failure else words, failure=failure)

    def _send(self, words: list[int], *, failure: Optional[Exception]) -> list[list[int]]:
        try:  # a bad EDFKERN_DIST_TIMEOUT on one rank is a local error like any other
            timeout = _comm.collective_timeout()
        except ValueError as e:
            timeout = datetime.timedelta(seconds=_comm.TIMEOUT_DEFAULT_S)
            failure, words = failure or e, []
        msg = b""
        if failure is not None:
            msg = str(failure).encode("utf-8", "replace")[:_MAX_MESSAGE]
        row = [MAGIC] + _name_words(self.op) + [self.counter, _kind(failure) if failure else 0, len(msg)]
        row += words + [0] * (PAYLOAD_WORDS - len(words))
        self.exchanged = True
        dev = _header_device(self.group)
        while True:
            table = _comm.gather_ints(row, group=self.group, device=dev, timeout=timeout,
                                      what=f"{self.op} header (call {self.counter} on this group; a rank that never "
                                           "makes this call, for example with process_group=None, leaves the others "
                                           "waiting here)")
            foreign = [r for r, t in enumerate(table) if t[0] != MAGIC]
            if foreign:
                raise _agreed(ValueError(
                    f"{self.op}: the header of call {self.counter} met a collective that is not an edfkern header "
                    f"(from rank(s) {foreign}): ranks issue different collectives on this group"))
            counters = [t[5] for t in table]
            if len(set(counters)) == 1:
                break
            if self.counter < max(counters):
                raise _agreed(ValueError(self._out_of_step(table)))
            # ahead of some rank: exchange again, to pair with the behind ranks' next call
        names = [_name_of(t[1:5]) for t in table]
        if len(set(names)) > 1:
            raise _agreed(ValueError(
                f"ranks called different edfkern ops on one process group (call {self.counter} on it): " +
                ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))))
        failed = [r for r, t in enumerate(table) if t[6]]
        if failed:
            texts = self._messages(table, msg, timeout)
            kind = _KINDS.get(table[failed[0]][6], RuntimeError)
            who = "; ".join(f"rank {r}: {texts[r]}" for r in failed)
            err = kind(f"{self.op} failed its checks on {len(failed)} of {len(table)} ranks, so every rank "
                       f"raises: {who}")
            raise _agreed(err) from failure
        return [t[_PREFIX:_PREFIX + len(words)] for t in table]

    def _out_of_step(self, table: list[list[int]]) -> str:
        at = ", ".join(f"rank {r}: call {t[5]} ({_name_of(t[1:5])})" for r, t in enumerate(table))
        return (f"{self.op}: edfkern op calls on this process group are out of step ({at}). A rank started a call "
                "that never sent its header (an error outside the op's checks, an interrupt, or an op called on "
                "some ranks only). This rank drops this call, so that its next call pairs with the others' "
                "current one")

    def _messages(self, table: list[list[int]], mine: bytes, timeout: datetime.timedelta) -> list[str]:
        """Every rank's local error message (one more collective, only when some rank failed)."""
        rank, size = _comm.world(self.group)
        width = max(max(t[7] for t in table), 1)
        buf = torch.zeros(size, width, dtype=torch.uint8, device=_header_device(self.group))
        buf[rank, :len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8) if mine else 0
        _comm.all_reduce_sum_([buf], group=self.group, timeout=timeout, what=f"{self.op} error messages")
        return [bytes(buf[r, :table[r][7]].tolist()).decode("utf-8", "replace") for r in range(size)]


def current_call() -> op_call:
    """The innermost :class:`op_call` in progress (``RuntimeError`` outside one)."""
    c = _CURRENT.get()
    if c is None:
        raise RuntimeError("edfkern.distributed: a header is exchanged inside an op call only; wrap the op with "
                           "@collective_op(name) or `with op_call(name, group)`")
    return c


def exchange(words: Sequence[int]) -> list[list[int]]:
    """:meth:`op_call.exchange` of the op call in progress."""
    return current_call().exchange(words)


def collective_op(name: Optional[str] = None, *, group_arg: str = "process_group",
                  none_means_default: bool = False) -> Callable:
    """Decorator of a distributed op: one :class:`op_call` per call (identity ``name``, default the
    function's name), on the group passed as keyword ``group_arg`` (``None`` is the default group when
    ``none_means_default``). Its collectives, header included, become :func:`last_call_stats`.

    Argument errors (a missing keyword, a wrong type) raise inside the call, so they too reach every rank.
    """
    def deco(fn: Callable) -> Callable:
        op = _check_op_name(name or fn.__name__)
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            group = kwargs.get(group_arg)
            if group is None and none_means_default:
                group = _comm.default_group()
            with _comm.record() as st, op_call(op, group):
                sig.bind(*args, **kwargs)  # a missing or unknown argument: a local error like any other
                out = fn(*args, **kwargs)
            _comm._LAST[op] = st
            return out

        return wrapper

    return deco


# ----------------------------------------------------------------------------- the row-sharded ops' words


@dataclass
class Side:
    """One input of an op as this rank sees it (features ``x`` of shape ``(n, *row_shape)``)."""

    name: str
    x: Tensor
    groups: C.GroupsArg
    num_groups: Optional[int]

    def words(self) -> list[int]:
        """``[dtype, n, row dims (2), declared K (0 = infer), label min, label max, K-divides-n flag,
        labels flag]``. Every check of ``groups`` that needs no other rank runs here (before the header)."""
        if self.x.device.type == "meta":
            raise ValueError(f"{self.name}: meta tensors carry no values; the distributed ops need real tensors")
        n = self.x.shape[0]
        row = list(self.x.shape[1:]) + [1] * (2 - (self.x.dim() - 1))
        num_groups = C._check_num_groups(self.num_groups)
        k = C._infer_k(self.name, self.groups, num_groups) or 0
        lo, hi, bad_div, labels = 0, -1, 0, isinstance(self.groups, Tensor)
        if labels:
            C._check_labels(self.name, self.groups, n, self.x.device)
            if n > 0:
                lo, hi = (int(v) for v in torch.stack(torch.aminmax(self.groups.to(torch.int64))).tolist())
        elif n % k != 0:
            bad_div = 1
        return [_DTYPE_CODE[self.x.dtype], n, row[0], row[1], k, lo, hi, bad_div, int(labels)]


_W = 9  # words per side


def agree(sides: Sequence[Side], extras: dict[str, float], *, what: str,
          allow_empty_groups: bool) -> tuple[int, list[list[int]]]:
    """Exchange the header of the op call in progress, check it on every rank alike, return ``(K, table)``.

    ``extras`` are float arguments (``weight``) that must be the same on every rank. ``K`` is the
    declared number of groups, else the largest label on any rank + 1; it is bounded by the rows of
    each side over all ranks (``allow_empty_groups``: by ``max(rows, MAX_SPARSE_GROUPS)``, the rule
    of ``local_covariance``), so no rank allocates K-sized statistics the others refuse.
    Raises ``ValueError`` on every rank when any rank's inputs disagree with the others'.
    """
    words: list[int] = []
    for s in sides:
        words += s.words()
    table = exchange(words + [float_bits(v) for v in extras.values()])
    for j, s in enumerate(sides):
        col = [r[j * _W:(j + 1) * _W] for r in table]
        same(col, 0, f"{s.name} dtype", lambda c: str(C.FLOAT_DTYPES[c]))
        same(col, 2, f"{s.name} row shape dim 1 (C or D)")
        same(col, 3, f"{s.name} row shape dim 2 (L)")
        same(col, 4, f"the number of groups of {s.name} (0 = inferred)")
        for r, c in enumerate(col):
            if c[7]:
                raise ValueError(f"{s.name}={c[4]} must divide the number of rows on rank {r}, which has {c[1]}")
    for i, name in enumerate(extras):
        same([r[len(sides) * _W:] for r in table], i, name, lambda b: repr(bits_float(b)))
    if len(sides) == 2:  # the two sides of a matching loss: one feature shape
        for r in table:
            if r[2:4] != r[_W + 2:_W + 4]:
                raise ValueError(f"{sides[1].name} must have the same per-row shape as {sides[0].name}, "
                                 f"got {r[_W + 2:_W + 4]} vs {r[2:4]}")
    declared = {r[j * _W + 4] for r in table for j in range(len(sides))} - {0}
    if len(declared) > 1:
        raise ValueError(f"the sides disagree on the number of groups: {sorted(declared)}")
    inferred = not declared
    if declared:
        k = declared.pop()
    else:
        hi = max((r[j * _W + 6] for r in table for j in range(len(sides)) if r[j * _W + 1] > 0), default=None)
        if hi is None:
            raise ValueError(f"{what}: no rank holds any row, so the number of groups cannot be inferred; "
                             "pass num_groups")
        k = hi + 1
    for j, s in enumerate(sides):
        for r, row in enumerate(table):
            c = row[j * _W:(j + 1) * _W]
            if c[1] > 0 and c[8] and (c[5] < 0 or c[6] >= k):
                raise ValueError(f"{s.name} labels on rank {r} must lie in [0, {k}), got values in [{c[5]}, {c[6]}]")
        rows = sum(row[j * _W + 1] for row in table)
        k_max = max(rows, C.MAX_SPARSE_GROUPS) if allow_empty_groups else rows
        if k > k_max:
            how = "max label + 1" if inferred else "num_groups"
            rule = ("at most max(rows over all ranks, MAX_SPARSE_GROUPS)" if allow_empty_groups else
                    "at most the rows over all ranks (every group of a loss needs a row)")
            raise ValueError(f"{what}: {how} = {k} groups is more than {k_max} allowed for {s.name} with {rows} "
                             f"rows over all ranks ({rule}); compact the labels or pass num_groups")
    return k, table


def same(col: list[list[int]], i: int, name: str, fmt: Callable[[int], str] = str) -> None:
    """``ValueError`` naming every rank's value unless word ``i`` of every row of ``col`` is the same."""
    vals = [c[i] for c in col]
    if any(v != vals[0] for v in vals):
        raise ValueError(f"{name} must be the same on every rank, got " +
                         ", ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(vals)))
