"""The small networks of the whole-step profiles (``python -m edfkern.bench --step``), no torchvision.

* :class:`ConvNet`: DM's / MTT's ConvNet, ``depth`` x [conv3x3 -> instance norm (``GroupNorm(w, w)``,
  affine) -> ReLU -> avgpool 2], then a linear classifier. At width 128, depth 3 on 3x32x32 it has
  320,010 parameters (the ``cifar10-ipc1000`` CPD P of docs/benchmarks.md) and its last block gives
  IID's local features ``(N, 128, 4, 4)``.
* :class:`FlatStudent`: that ConvNet evaluated from one flat parameter vector (MTT's ReparamModule),
  for the unrolled student.
* :func:`conv_costs`: per-image activation bytes and FLOPs of a ConvNet, the shape model behind the
  step bench's memory and time estimates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ConvNet", "FlatStudent", "seeded_convnet", "flat_params", "ConvCosts", "conv_costs"]


class ConvNet(nn.Module):
    """``depth`` x [conv3x3 - GroupNorm(w, w) - ReLU - AvgPool2d(2)] -> Linear.

    ``features(x)``: ``(N, C, H, W)`` -> ``(N, width, H / 2^depth, W / 2^depth)``; ``forward``: logits ``(N, K)``.
    """

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 128, depth: int = 3,
                 size: int = 32) -> None:
        super().__init__()
        if size % (2 ** depth):
            raise ValueError(f"size must be divisible by 2**depth = {2 ** depth}, got {size}")
        blocks, c, s = [], channels, size
        for _ in range(depth):
            blocks.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                                        nn.ReLU(), nn.AvgPool2d(2)))
            c, s = width, s // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width * s * s, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def seeded_convnet(seed: int, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw) -> ConvNet:
    """A :class:`ConvNet` whose weights depend only on ``seed`` (drawn in float32, then cast to ``dtype``,
    so a float64 copy holds exactly the float32 net's values)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = ConvNet(**kw)
    finally:
        torch.random.set_rng_state(state)
    return net.to(device=device, dtype=dtype)


def flat_params(net: nn.Module) -> Tensor:
    """All parameters as one detached flat vector ``(P,)``, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()


class FlatStudent:
    """``net`` evaluated from a flat parameter vector ``(P,)`` via ``torch.func.functional_call``."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.specs = [(n, p.shape, p.numel()) for n, p in net.named_parameters()]
        self.num_params = sum(n for _, _, n in self.specs)

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        params, off = {}, 0
        for name, shape, n in self.specs:
            params[name] = flat[off:off + n].view(shape)
            off += n
        return torch.func.functional_call(self.net, params, (x,))


@dataclass(frozen=True)
class ConvCosts:
    """Per-image figures of one :class:`ConvNet` (floats are 4 bytes in float32)."""

    saved_floats: int      # activations autograd keeps for backward (conv outputs, ReLU outputs, pool outputs)
    peak_layer_floats: int  # the largest single activation (block 1's conv output)
    fwd_flops: int         # forward multiply-adds x 2 (convolutions and the classifier)
    params: int


def conv_costs(width: int = 128, depth: int = 3, size: int = 32, channels: int = 3,
               num_classes: int = 10) -> ConvCosts:
    """Per image: what autograd saves (GroupNorm keeps its input = the conv output, ReLU its output,
    which AvgPool also reads; the next conv keeps the pool output), the largest activation, FLOPs."""
    saved = peak = flops = 0
    c, s = channels, size
    params = 0
    for _ in range(depth):
        act = width * s * s
        saved += 2 * act + width * (s // 2) ** 2
        peak = max(peak, act)
        flops += 2 * c * width * 9 * s * s
        params += c * width * 9 + width + 2 * width
        c, s = width, s // 2
    flops += 2 * width * s * s * num_classes
    params += width * s * s * num_classes + num_classes
    return ConvCosts(saved_floats=saved, peak_layer_floats=peak, fwd_flops=flops, params=params)

