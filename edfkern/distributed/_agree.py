"""How the ranks agree on an op's arguments before any data moves.

Each distributed op first exchanges one small int64 table (:func:`edfkern.distributed._comm.gather_ints`):
one row per rank with, for every input side, its dtype, row count, per-row shape, declared number of
groups and label range, plus the scalar arguments. Every rank then runs the same checks on the same
table, so bad input on one rank (labels out of range there, a different ``C``) raises the same
``ValueError`` on *all* ranks instead of leaving the others waiting in a collective.

The table comes first because the size of every later buffer depends on ``K``, ``C`` and ``L``:
ranks that disagree on them must find out before they post buffers of different sizes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _checks as C
from . import _comm

_DTYPE_CODE = {dt: i for i, dt in enumerate(C.FLOAT_DTYPES)}


def float_bits(v: float) -> int:
    """The float64 bit pattern of ``v`` as an int (so a float argument can ride in the int table)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


@dataclass
class Side:
    """One input of an op as this rank sees it (features ``x`` of shape ``(n, *row_shape)``)."""

    name: str
    x: Tensor
    groups: C.GroupsArg
    num_groups: Optional[int]

    def words(self) -> list[int]:
        """``[dtype, n, row dims (2), declared K (0 = infer), label min, label max, K-divides-n flag]``."""
        n = self.x.shape[0]
        row = list(self.x.shape[1:]) + [1] * (2 - (self.x.dim() - 1))
        k = C._infer_k(self.name, self.groups, self.num_groups) or 0  # type checks are local and cheap
        lo, hi, bad_div = 0, -1, 0
        if isinstance(self.groups, Tensor):
            C._check_labels(self.name, self.groups, n, self.x.device)
            if n > 0:
                lo, hi = (int(v) for v in torch.stack(torch.aminmax(self.groups.to(torch.int64))).tolist())
        elif n % self.groups != 0:
            bad_div = 1
        return [_DTYPE_CODE[self.x.dtype], n, row[0], row[1], k, lo, hi, bad_div]


_W = 8  # words per side


def agree(sides: Sequence[Side], extras: dict[str, int], *, group, what: str) -> tuple[int, list[list[int]]]:
    """Exchange the table, check it on every rank alike, and return ``(K, table)``.

    ``extras`` are scalar arguments (e.g. ``weight`` as :func:`float_bits`) that must agree across ranks.
    Raises ``ValueError`` on every rank when any rank's inputs disagree with the others'.
    """
    words: list[int] = []
    for s in sides:
        words += s.words()
    words += list(extras.values())
    table = _comm.gather_ints(words, group=group, device=sides[0].x.device, what=f"{what} header")
    for j, s in enumerate(sides):
        col = [r[j * _W:(j + 1) * _W] for r in table]
        _same(col, 0, f"{s.name} dtype", lambda c: str(C.FLOAT_DTYPES[c]))
        _same(col, 2, f"{s.name} row shape dim 1 (C or D)")
        _same(col, 3, f"{s.name} row shape dim 2 (L)")
        _same(col, 4, f"the number of groups of {s.name} (0 = inferred)")
        for r, c in enumerate(col):
            if c[7]:
                raise ValueError(f"{s.name}={c[4]} must divide the number of rows on rank {r}, which has {c[1]}")
    for i, name in enumerate(extras):
        _same([r[len(sides) * _W:] for r in table], i, name)
    if len(sides) == 2:  # the two sides of a matching loss: one feature shape
        for r in table:
            if r[2:4] != r[_W + 2:_W + 4]:
                raise ValueError(f"{sides[1].name} must have the same per-row shape as {sides[0].name}, "
                                 f"got {r[_W + 2:_W + 4]} vs {r[2:4]}")
    declared = {r[j * _W + 4] for r in table for j in range(len(sides))} - {0}
    if len(declared) > 1:
        raise ValueError(f"the sides disagree on the number of groups: {sorted(declared)}")
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
            if c[1] > 0 and isinstance(s.groups, Tensor) and (c[5] < 0 or c[6] >= k):
                raise ValueError(f"{s.name} labels on rank {r} must lie in [0, {k}), got values in [{c[5]}, {c[6]}]")
    return k, table


def _same(col: list[list[int]], i: int, name: str, fmt=str) -> None:
    vals = [c[i] for c in col]
    if any(v != vals[0] for v in vals):
        raise ValueError(f"{name} must be the same on every rank, got " +
                         ", ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(vals)))
