"""Reference Grad-CAM (docs/ops.md): channel weights, weighted sum, ReLU, min-max, upsample."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import acc_dtype
from ._common import upsample

EPS = 1e-8


def _alpha(g2: Tensor, g3: Tensor, act: Tensor) -> Tensor:
    """alpha = g2 / (2 g2 + sum_hw(act * g3) + 1e-8), over (N,C,h,w)."""
    return g2 / (2 * g2 + (act * g3).sum(dim=(-2, -1), keepdim=True) + EPS)


def grad_cam(A: Tensor, G: Tensor, A_clean: Optional[Tensor], method: str, normalize: bool,
             size: Optional[tuple[int, int]]) -> Tensor:
    acc = acc_dtype(A.dtype)
    A, G = A.to(acc), G.to(acc)
    if method == "gradcam":
        w = G.mean(dim=(-2, -1))
    elif method == "gradcam++":
        w = (_alpha(G * G, G * G * G, A) * torch.relu(G)).sum(dim=(-2, -1))
    else:  # smoothgradcam++: moments over the S noisy passes, clean activations in the denominator
        alpha = _alpha((G * G).mean(0), (G * G * G).mean(0), A_clean.to(acc))
        A, G = A[-1], G[-1]
        w = (alpha * torch.relu(G)).sum(dim=(-2, -1))
    cam = torch.relu((w[..., None, None] * A).sum(1))
    if normalize:
        cam = cam - cam.amin(dim=(1, 2), keepdim=True)
        cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + EPS)
    return cam if size is None else upsample(cam, size)
