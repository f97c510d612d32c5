"""Small float64 models shared by the CAM and Comp-DD tests."""
from __future__ import annotations

import torch
from torch import nn


def staged_convnet(num_classes: int, widths: tuple[int, int, int] = (6, 8, 8), *, inplace_relu: bool = False,
                   seed: int = 0) -> nn.Sequential:
    """``layer1..layer3`` (conv, BatchNorm in eval statistics, ReLU) at strides 1, 2, 2, then pool and fc.

    Three resolutions, so multi-layer CAMs are tested at three map sizes; BatchNorm running
    statistics are randomised so eval mode is not the identity. float64 for exact comparisons.
    """
    torch.manual_seed(seed)

    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=inplace_relu))

    model = nn.Sequential()
    cin = 3
    for i, (w, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
        model.add_module(f"layer{i}", stage(cin, w, stride))
        cin = w
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(cin, num_classes))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.double()
