"""Distributed Common Pattern Dropout: the exact keep-set of a global stable sort, with no gather.

Layout: the flat vector of length ``P`` is split into contiguous chunks, one per rank, in rank order
(FSDP's flat-parameter layout); chunk sizes may be uneven or zero. The dropped set is the
``k = floor(drop_ratio * P)`` smallest ``l`` with ties going to the lower *global* index, i.e. the first
``k`` entries of ``torch.sort(l_all, stable=True)``, bit for bit.

Selection, on the order-preserving integer key of each float (``-0`` is read as ``+0``, every NaN as one
key above ``+inf``: the order of a stable ``torch.sort``, which puts NaNs last):

1. one radix pass per byte of the key, most significant first: each rank histograms (256 bins) the
   digits of its candidates, the histograms are all-reduced, and every rank picks the same bin that
   holds the k-th smallest key; after 4 passes (float32) or 8 (float64) the threshold key ``thr`` and
   the number of its copies that must still be dropped are exact;
2. one exclusive prefix over ranks of the count of elements equal to ``thr`` tells each rank how many of
   its own tied elements (the first ones, in index order) are dropped;
3. one all-reduce of the kept sums: ``loss = sum_K l / sum_K d``.

Payload per rank and call (bytes handed to the collectives; a ring all-reduce sends about
``2 (W-1)/W`` times that): ``256 W`` (header) ``+ passes * 2048 + 8 W`` (tie prefix) ``+ 2 * itemsize``
(sums), with ``passes`` 4 for float32/16 inputs and 8 for float64, and no selection at all when
``k == 0``. It does not grow with ``P``. Backward issues no collective.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from .._dispatch import kernel
from . import _comm
from ._agree import HEADER_BYTES_PER_RANK, _DTYPE_CODE, bits_float, collective_op, exchange, float_bits, same

__all__ = ["cpd_trajectory_loss", "cpd_keep_mask", "select_threshold", "order_keys", "payload_bytes"]

_BINS = 256




def _spec(dtype: torch.dtype) -> tuple[int, int, int, torch.dtype]:
    """(key bits, magnitude mask, canonical NaN bits, int view dtype) of a float32/float64 tensor."""
    if dtype == torch.float64:
        return 64, 0x7FFFFFFFFFFFFFFF, 0x7FF8000000000000, torch.int64
    return 32, 0x7FFFFFFF, 0x7FC00000, torch.int32


def order_keys(l: Tensor) -> Tensor:
    """int64 keys with ``key(a) < key(b)`` iff ``a`` sorts before ``b`` in ``torch.sort`` (ties: equal keys).

    ``l`` is float32 or float64. ``-0.0`` maps to the key of ``+0.0``; every NaN to one key above ``+inf``.
    """
    _, mask, nan, view = _spec(l.dtype)
    b = l.view(view).to(torch.int64)  # float32 bits are sign-extended, so the int64 order is the int32 order
    b = torch.where(l == 0, torch.zeros_like(b), b)
    b = torch.where(l.isnan(), torch.full_like(b, nan), b)
    return torch.where(b < 0, b ^ mask, b)


def _key_to_float(key: int, dtype: torch.dtype) -> Tensor:
    _, mask, _, view = _spec(dtype)
    b = key if key >= 0 else key ^ mask
    return torch.tensor([b], dtype=torch.int64).to(view).view(dtype)[0]


def select_threshold(keys: Tensor, k: int, nbits: int, *, group) -> tuple[int, int]:
    """The global k-th smallest key ``thr`` (1-based ``k >= 1``) and this rank's local tie index.

    This rank drops exactly its elements with ``key < thr``, and those with ``key == thr`` at local
    index ``< tie``. All ranks together drop the first ``k`` of a global stable ascending sort.
    """
    target, cand, thr = k - 1, keys, 0
    for shift in range(nbits - 8, -1, -8):
        digit = (cand >> shift) + 128 if shift == nbits - 8 else (cand >> shift) & 0xFF
        hist = torch.bincount(digit, minlength=_BINS)
        _comm.all_reduce_sum_([hist], group=group, what="CPD radix histogram")
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([target], device=cum.device), right=True)[0])
        target -= int(cum[b - 1]) if b > 0 else 0
        thr += (b - 128 if shift == nbits - 8 else b) << shift
        cand = cand[digit == b]
    to_drop = target + 1  # copies of thr that a stable sort drops, counted from the lowest global index
    counts = _comm.gather_ints([cand.numel()], group=group, device=keys.device, what="CPD tie prefix")
    rank, _ = _comm.world(group)
    before = sum(r[0] for r in counts[:rank])
    mine = min(max(to_drop - before, 0), cand.numel())
    if mine == 0:
        return thr, 0
    tied = (keys == thr).nonzero()[:, 0]
    return thr, int(tied[mine - 1]) + 1


def _dropped(keys: Tensor, thr: int, tie: int) -> Tensor:
    idx = torch.arange(keys.numel(), device=keys.device)
    return (keys < thr) | ((keys == thr) & (idx < tie))


def _check_numel(numel: Optional[int]) -> Optional[int]:
    return None if numel is None else C.check_int("numel", numel, lo=0, hi=2**62)


def _agree_chunks(n: int, dtype: torch.dtype, drop_ratio: float, numel: Optional[int], group,
                  allow_empty: bool = False) -> tuple[int, int]:
    """Header: every rank's chunk length, dtype, ``drop_ratio`` and declared ``P``. Returns ``(P, offset)``."""
    table = exchange([_DTYPE_CODE[dtype], n, -1 if numel is None else numel, float_bits(drop_ratio)])
    sizes = [r[1] for r in table]
    same(table, 0, "dtype", lambda c: str(C.FLOAT_DTYPES[c]))
    same(table, 3, "drop_ratio", lambda b: repr(bits_float(b)))
    p = sum(sizes)
    declared = {r[2] for r in table} - {-1}
    if declared and declared != {p}:
        raise ValueError(f"the CPD chunks do not add up: chunk sizes {sizes} in rank order sum to {p}, but numel "
                         f"{sorted(declared)} was declared")
    if p == 0 and not allow_empty:
        raise ValueError("student must hold at least one parameter over all ranks (P >= 1), got empty chunks")
    rank, _ = _comm.world(group)
    return p, sum(sizes[:rank])


def _select_local(l: Tensor, k: int, group) -> tuple[Tensor, int, int]:
    """(keys, thr key, local tie) for this rank's ``l`` (acc dtype); ``k == 0`` drops nothing."""
    keys = order_keys(l)
    if k == 0:
        return keys, _MIN_KEY, 0
    thr, tie = select_threshold(keys, k, _spec(l.dtype)[0], group=group)
    return keys, thr, tie


_MIN_KEY = -(1 << 63)  # below every key: nothing is dropped


class _CPDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, target, start, k, group):
        acc = C.acc_dtype(student.dtype)
        s, t, s0 = (v.reshape(-1).to(acc) for v in (student, target, start))
        l, d = (s - t) * (s - t), (s0 - t) * (s0 - t)
        keys, thr, tie = _select_local(l, k, group)
        keep = ~_dropped(keys, thr, tie)
        zero = l.new_zeros(())
        sums = torch.stack([torch.where(keep, l, zero).sum(), torch.where(keep, d, zero).sum()])
        _comm.all_reduce_sum_([sums], group=group, what="CPD kept sums")
        ctx.save_for_backward(student, target, start)
        ctx.thr, ctx.tie, ctx.sum_d = thr, tie, sums[1]
        return sums[0] / sums[1]

    @staticmethod
    def backward(ctx, g):
        student, target, start = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if student.numel() == 0:
            return torch.zeros_like(student), None, None, None, None
        acc = ctx.sum_d.dtype
        dev = student.device
        thr = (torch.tensor(float("-inf"), dtype=acc) if ctx.thr == _MIN_KEY else _key_to_float(ctx.thr, acc)).to(dev)
        if thr.isnan():  # a NaN threshold: the kernels compare floats, and NaN == NaN is false there
            s, t = student.reshape(-1).to(acc), target.reshape(-1).to(acc)
            keep = ~_dropped(order_keys((s - t) * (s - t)), ctx.thr, ctx.tie)
            gs = torch.where(keep, 2 * (s - t), torch.zeros_like(s)) * (g.to(acc) / ctx.sum_d)
            return gs.to(student.dtype).view(student.shape), None, None, None, None
        flat = [v.reshape(-1).contiguous() for v in (student, target, start)]
        gs = kernel("cpd_backward", dev)(g.to(acc), *flat, thr,
                                         torch.tensor(ctx.tie, dtype=torch.int64, device=dev), ctx.sum_d)
        return gs.view(student.shape), None, None, None, None


@collective_op()
def cpd_trajectory_loss(student: Tensor, target: Tensor, start: Tensor, *, drop_ratio: float, process_group,
                        numel: Optional[int] = None) -> Tensor:
    """:func:`edfkern.cpd_trajectory_loss` over a flat vector split into one contiguous chunk per rank.

    Args:
        student, target, start: this rank's chunk (any shape, read flat; the chunk may be empty).
            Rank ``r`` holds global indices ``[sum of earlier chunks, + its numel)``.
        drop_ratio: in ``[0, 1)``, the same on every rank.
        process_group: the ``torch.distributed`` group. An inactive one (``None``, or no initialised
            default group) runs this algorithm on this process's chunk alone.
        numel: optional total ``P`` the caller expects (for example the FSDP flat parameter's size);
            ``ValueError`` on every rank if the chunk sizes do not add up to it.

    Returns:
        ``sum_K l / sum_K d`` over the global keep-set, the same value on every rank. The gradient flows
        to ``student`` (this rank's chunk) only, with no collective in backward.
    """
    C.check_cpd_vectors(student, target, start)
    drop_ratio = C.check_drop_ratio(drop_ratio)
    p, _ = _agree_chunks(student.numel(), student.dtype, drop_ratio, _check_numel(numel), process_group)
    return _CPDLoss.apply(student, target, start, C.drop_count(drop_ratio, p), process_group)


@collective_op()
def cpd_keep_mask(l: Tensor, drop_ratio: float, *, process_group, numel: Optional[int] = None) -> Tensor:
    """:func:`edfkern.cpd_keep_mask` for this rank's contiguous chunk of a flat ``l`` split over ranks.

    Returns a bool tensor shaped like ``l``: the chunk's part of the keep-set of a global stable sort.
    """
    C.check_float_tensor("l", l)
    drop_ratio = C.check_drop_ratio(drop_ratio)
    p, _ = _agree_chunks(l.numel(), l.dtype, drop_ratio, _check_numel(numel), process_group, allow_empty=True)
    flat = l.reshape(-1).to(C.acc_dtype(l.dtype))
    keys, thr, tie = _select_local(flat, C.drop_count(drop_ratio, p), process_group)
    return (~_dropped(keys, thr, tie)).view(l.shape)


def payload_bytes(world_size: int, dtype: torch.dtype = torch.float32, *, drops: bool = True) -> int:
    """Bytes this rank hands to collectives per :func:`cpd_trajectory_loss` call (see the module docstring)."""
    acc = C.acc_dtype(dtype)
    passes = _spec(acc)[0] // 8
    select = passes * _BINS * 8 + 8 * world_size if drops else 0
    return HEADER_BYTES_PER_RANK * world_size + select + 2 * torch.empty((), dtype=acc).element_size()
