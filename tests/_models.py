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


# The source of a model module the Comp-DD CLI tests write to a file and load by ``--model module:build``:
# ``build(width=3, bias=0.0)`` (two conv stages, float64: thresholded maps cannot flip with the batch
# composition), ``build10`` (10 classes) and ``other_weights`` (another fc bias). With
# EDGES_FAIL_AFTER_FORWARDS=n the forward number n + 1 raises (a preempted run).
MODEL_MODULE = '''
import os
import torch
from torch import nn

def build(width=3, bias=0.0):
    torch.manual_seed(0)
    stage = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1), nn.ReLU())
    m = nn.Sequential()
    m.add_module("layer1", stage(3, 6, 1))
    m.add_module("layer2", stage(6, 8, 2))
    m.add_module("pool", nn.AdaptiveAvgPool2d(1))
    m.add_module("flatten", nn.Flatten())
    m.add_module("fc", nn.Linear(8, width))
    with torch.no_grad():
        m.fc.bias.add_(bias)
    m = m.double()
    fail = int(os.environ.get("EDGES_FAIL_AFTER_FORWARDS", "0"))
    if fail:  # a preempted run: the forward number `fail` + 1 raises
        calls = [0]

        def hook(mod, inp):
            calls[0] += 1
            if calls[0] > fail:
                raise RuntimeError("simulated preemption")
        m.register_forward_pre_hook(hook)
    return m

def build10():
    return build(10)

def other_weights():
    return build(bias=1.0)
'''
