"""CAMExtractor against torchcam 0.4's own SmoothGradCAMpp (the CAM EDF's released code uses).

torchcam 0.4.0 is pure PyTorch; it is installed with ``--no-deps`` so it cannot pull in
torchvision (the README's test command does this). Same model, same inputs, same noise:
torchcam draws its noise from the global RNG, ``CAMExtractor`` from the generator we give it,
seeded identically, one ``(N, C, H, W)`` draw per noisy pass in both (float32: torchcam's
``Normal(0, std)`` always samples float32 noise).

Not compared: torchcam 0.4.0's ``GradCAMpp``. Its ``alpha[idx][mask].div_(...)`` divides a
boolean-indexed *copy*, so its alpha stays ``G^2``; edfkern follows the formula in docs/ops.md
``G^2 / (2 G^2 + sum(A G^3) + 1e-8)``, which is what torchcam's ``SmoothGradCAMpp`` (EDF's CAM) uses.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from edfkern.cam import CAMExtractor

if os.environ.get("CI"):  # CI installs it (the README's test command): a missing torchcam must fail there
    import torchcam.methods as torchcam_methods
else:
    torchcam_methods = pytest.importorskip("torchcam.methods", reason="pip install --no-deps torchcam==0.4.0")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    ).eval()


@pytest.mark.parametrize("cls", [0, 3])
def test_smoothgradcampp_matches_torchcam_0_4(backend, cls):
    model = _model()
    x = torch.randn(6, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    with torchcam_methods.SmoothGradCAMpp(model, target_layer="4", num_samples=4, std=0.3) as tc:
        torch.manual_seed(123)
        scores = model(x)
        expected = tc(cls, scores)[0]  # torchcam: one (N, h, w) map per target layer, normalised
    with CAMExtractor(model, "4", method="smoothgradcam++", num_samples=4, std=0.3) as ext:
        got = ext(x, cls, generator=torch.Generator().manual_seed(123))
    assert got.shape == expected.shape == (6, 8, 6)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,tc_name", [("gradcam", "GradCAM")])
def test_gradcam_matches_torchcam_0_4(backend, method, tc_name):
    model = _model()
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with getattr(torchcam_methods, tc_name)(model, target_layer="4") as tc:
        expected = tc(2, model(x))[0]
    with CAMExtractor(model, "4", method=method) as ext:
        got = ext(x, 2)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)
