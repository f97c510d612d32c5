"""Helpers shared by the reference kernels."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config
from .._checks import acc_dtype, row_labels


@contextlib.contextmanager
def ieee_matmul() -> Iterator[None]:
    """Full-precision fp32 matmul on CUDA unless ``edfkern.config.allow_tf32`` is set."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(config.allow_tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=False, no antialias: (N,h,w) -> (N,H,W).

    At the same size this is ``maps * 1 + maps * 0``, exactly what F.interpolate computes there:
    finite values unchanged, an infinity turned into NaN (docs/special-values.md).
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps + maps * 0
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def flat_values(maps: Tensor) -> Tensor:
    """(N,h,w) -> (N,): the value of each map whose entries are all equal and finite, else NaN.

    A flat map upsamples to itself exactly and is its own mean (docs/special-values.md).
    """
    flat = maps.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    return torch.where((lo == hi) & lo.isfinite(), lo, torch.full_like(lo, float("nan")))


def class_means(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Row labels (N,) and per-class means (K, ...) in acc (zeros for empty classes)."""
    n = x.shape[0]
    k = offsets.numel() - 1
    acc = acc_dtype(x.dtype)
    labels = row_labels(perm, offsets, n)
    counts = offsets.diff().clamp_min(1).to(acc)
    sums = torch.zeros((k,) + tuple(x.shape[1:]), dtype=acc, device=x.device).index_add_(0, labels, x.to(acc))
    return labels, sums / counts.view((k,) + (1,) * (x.dim() - 1))


def grouped(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row labels, per-class means and centred rows, all in acc.

    x (N, ...) -> (labels (N,), mean (K, ...), xc (N, ...)) with xc_i = x_i - mean_{label_i}.
    """
    labels, mean = class_means(x, perm, offsets)
    return labels, mean, x.to(mean.dtype) - mean[labels]


def padded(xc: Tensor, labels: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Scatter rows into a zero-padded (K, n_max, ...) block; returns it and each row's slot in it.

    With equal group sizes and perm None this is a free view.
    """
    n = xc.shape[0]
    k = offsets.numel() - 1
    counts = offsets.diff()
    n_max = int(counts.max()) if k > 0 else 0
    if perm is None and n == k * n_max:
        return xc.view((k, n_max) + tuple(xc.shape[1:])), torch.arange(n, device=xc.device) % max(n_max, 1)
    pos_sorted = torch.arange(n, device=xc.device) - torch.repeat_interleave(offsets[:-1], counts, output_size=n)
    pos = pos_sorted if perm is None else torch.empty_like(pos_sorted).index_put_((perm,), pos_sorted)
    out = xc.new_zeros((k, n_max) + tuple(xc.shape[1:]))
    out[labels, pos] = xc
    return out, pos
