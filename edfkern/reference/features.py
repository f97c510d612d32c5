"""Reference segmented reductions over flat features (docs/ops.md: CC and DM)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._checks import row_labels
from ._common import class_means, grouped


def seg_mean(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> Tensor:
    return class_means(x, perm, offsets)[1]


def cc_forward(x: Tensor, perm: Optional[Tensor], offsets: Tensor) -> tuple[Tensor, Tensor]:
    _, mean, xc = grouped(x, perm, offsets)
    return (xc * xc).sum(), mean


def cc_backward(grad_out: Tensor, x: Tensor, perm: Optional[Tensor], offsets: Tensor, mean: Tensor,
                coef: float) -> Tensor:
    xc = x.to(mean.dtype) - mean[row_labels(perm, offsets, x.shape[0])]
    return (xc * (coef * grad_out.to(mean.dtype))).to(x.dtype)
