"""Reference DAE kernels (docs/ops.md): materialise U(cam) and the mask, then apply them.

Memory traffic (the fused backends avoid the middle two):
    read cam (N*h*w) -> write/read U(cam) (N*H*W) -> write/read mask (N*H*W) -> read/write grad (N*C*H*W).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import acc_dtype
from ._common import flat_values, upsample


def _mask(cam: Tensor, beta: float, threshold: Optional[float], size: tuple[int, int],
          like: Optional[Tensor] = None) -> Tensor:
    """(N,H,W) mask in acc: U(cam)+beta where U(cam) >= tau, else 1.

    acc: ``acc_dtype`` of the CAM and the tensor it scales (``like``): float64 if either is float64.
    A flat map (all values equal and finite) upsamples to that value exactly and is its own mean.
    """
    acc = acc_dtype(cam.dtype, like.dtype if like is not None else cam.dtype)
    c = cam.to(acc)
    u = upsample(c, size)
    fv = flat_values(c)[:, None, None]
    is_flat = fv == fv
    tau = threshold if threshold is not None else torch.where(is_flat, fv, u.mean(dim=(1, 2), keepdim=True))
    u = torch.where(is_flat, fv, u)
    return torch.where(u >= tau, u + beta, torch.ones_like(u))


def dae_mask(cam: Tensor, beta: float, threshold: Optional[float], H: int, W: int) -> Tensor:
    return _mask(cam, beta, threshold, (H, W)).to(cam.dtype)[:, None]


def dae_(grad: Tensor, cam: Tensor, beta: float, threshold: Optional[float]) -> None:
    m = _mask(cam, beta, threshold, tuple(grad.shape[-2:]), grad)[:, None]
    grad.copy_(grad.to(m.dtype) * m)


def dae_sgd_step_(param: Tensor, grad: Tensor, buf: Optional[Tensor], cam: Tensor, lr: float, beta: float,
                  threshold: Optional[float], momentum: float, dampening: float, weight_decay: float,
                  nesterov: bool, maximize: bool, first_step: bool) -> None:
    m = _mask(cam, beta, threshold, tuple(grad.shape[-2:]), grad)[:, None]
    d = grad.to(m.dtype) * m
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * param.to(d.dtype)
    if momentum != 0:
        assert buf is not None
        b = d if first_step else buf.to(d.dtype) * momentum + (1 - dampening) * d
        buf.copy_(b)
        b = buf.to(d.dtype)  # the stored value, as torch.optim.SGD uses it
        d = d + momentum * b if nesterov else b
    param.copy_(param.to(d.dtype) - lr * d)
