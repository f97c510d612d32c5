"""Reference local covariance (docs/ops.md), batched over classes without (N,C,C) products.

Centred rows are laid out per class as Y_k = [Xc_i]_{i in k} of shape (C, n_k*L), so
Sigma_k = Y_k Y_k^T / n_k is one batched matmul. Bytes: read x once, write the centred
(N,C,L) copy once; FLOPs: 2*N*C*C*L.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import row_labels
from ._common import grouped, ieee_matmul, padded


def cov_forward(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    n, c, l = x.shape
    k = offsets.numel() - 1
    labels, mean, xc = grouped(x, perm, offsets)
    blocks, _ = padded(xc, labels, perm, offsets)  # (K, n_max, C, L), zero rows add nothing
    y = blocks.permute(0, 2, 1, 3).reshape(k, c, -1)
    with ieee_matmul():
        sigma = torch.bmm(y, y.transpose(1, 2))
    return sigma / offsets.diff().clamp_min(1).to(sigma.dtype)[:, None, None], mean


def cov_backward(x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor, M: Tensor) -> Tensor:
    n, c, l = x.shape
    k = offsets.numel() - 1
    labels = row_labels(perm, offsets, n)
    xc = x.to(mean.dtype) - mean[labels]
    blocks, pos = padded(xc, labels, perm, offsets)  # (K, n_max, C, L)
    y = blocks.permute(0, 2, 1, 3).reshape(k, c, -1)  # (K, C, n_max*L): one matmul per class, no (C, C) per row
    with ieee_matmul():
        g = torch.bmm(M, y)
    g = g.view(k, c, -1, l).permute(0, 2, 1, 3)  # (K, n_max, C, L)
    return g[labels, pos].to(x.dtype)
