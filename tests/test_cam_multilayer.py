"""CAMExtractor with several target layers: one set of passes, the same maps per layer.

Each layer's maps must equal those of a single-layer extractor given the same noise (a
seeded generator, or injected ``noise=``), for every method, with and without chunking.
The model runs in float64 so the comparison is tight.
"""
import pytest
import torch
from torch import nn

from edfkern.cam import CAMExtractor
from tests._models import staged_convnet


def resnetish(num_classes=6):
    """Three stages at different resolutions, with an in-place ReLU."""
    return staged_convnet(num_classes, (6, 8, 10), inplace_relu=True)


LAYERS = ["layer1", "layer2", "layer3"]


def _count_forward_calls(model):
    calls = []
    h = model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    return calls, h


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "smoothgradcam++"])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_each_layer_equals_single_layer_extractor(method, batch_size):
    model = resnetish()
    torch.manual_seed(3)
    x = torch.randn(7, 3, 12, 12, dtype=torch.float64)
    cls = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    with CAMExtractor(model, LAYERS, method=method, num_samples=3, batch_size=batch_size) as ex:
        multi = ex(x, cls, generator=torch.Generator().manual_seed(9))
    assert isinstance(multi, list) and [tuple(m.shape) for m in multi] == [(7, 12, 12), (7, 6, 6), (7, 3, 3)]
    for name, got in zip(LAYERS, multi):
        with CAMExtractor(model, name, method=method, num_samples=3, batch_size=batch_size) as one:
            expected = one(x, cls, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        assert float(got.amax()) > 0.5


def test_injected_noise_and_predicted_class():
    model = resnetish()
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 5, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    predicted = model.eval()(x).argmax(1)
    with CAMExtractor(model, LAYERS) as ex:
        multi = ex(x, "predicted", noise=noise)
    for name, got in zip(LAYERS, multi):
        with CAMExtractor(model, name) as one:
            torch.testing.assert_close(got, one(x, predicted, noise=noise), rtol=0, atol=1e-12)
    # noise= is the same as the documented generator convention (one randn(N,C,H,W) per pass)
    g = torch.Generator().manual_seed(5)
    drawn = torch.stack([torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(4)])
    with CAMExtractor(model, "layer2") as one:
        a = one(x, 1, noise=drawn)
        b = one(x, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_passes_are_shared():
    model = resnetish()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    calls, h = _count_forward_calls(model)
    try:
        with CAMExtractor(model, LAYERS, num_samples=3) as ex:
            ex(x, 0)
    finally:
        h.remove()
    assert calls == [4, 12]  # one clean pass, one pass over all 3 * 4 noisy rows, for all three layers


def test_single_element_list_returns_list_and_model_untouched():
    model = resnetish()
    model.train()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with CAMExtractor(model, ["layer2"]) as ex:
        out = ex(x, 1)
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (3, 6, 6)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_nested_and_module_forms():
    model = resnetish()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    # "layer2" and its own conv "layer2.0": the inner layer fires first inside the outer one
    with CAMExtractor(model, [model.layer2, "layer2.0"], num_samples=2) as ex:
        outer, inner = ex(x, 2, generator=torch.Generator().manual_seed(0))
    with CAMExtractor(model, "layer2.0", num_samples=2) as one:
        torch.testing.assert_close(inner, one(x, 2, generator=torch.Generator().manual_seed(0)), rtol=0, atol=1e-12)
    with CAMExtractor(model, "layer2", num_samples=2) as one:
        torch.testing.assert_close(outer, one(x, 2, generator=torch.Generator().manual_seed(0)), rtol=0, atol=1e-12)


def test_bad_arguments():
    model = resnetish()
    with pytest.raises(ValueError, match="at least one"):
        CAMExtractor(model, [])
    with pytest.raises(ValueError, match="same module"):
        CAMExtractor(model, ["layer1", model.layer1])
    with pytest.raises(ValueError, match="not a submodule"):
        CAMExtractor(model, ["layer1", "layer9"])
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with CAMExtractor(model, LAYERS) as ex:
        with pytest.raises(ValueError, match="noise must be a tensor of shape"):
            ex(x, 0, noise=torch.randn(3, 2, 3, 12, 12, dtype=torch.float64))
        with pytest.raises(ValueError, match="dtype and device"):
            ex(x, 0, noise=torch.randn(4, 2, 3, 12, 12))
        with pytest.raises(ValueError, match="'predicted'"):
            ex(x, "argmax")
    with CAMExtractor(model, LAYERS, method="gradcam") as ex:
        with pytest.raises(ValueError, match="only used by"):
            ex(x, 0, noise=torch.randn(4, 2, 3, 12, 12, dtype=torch.float64))
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = model, nn.Conv2d(3, 3, 1).double()  # the forward never calls spare

        def forward(self, inp):
            return self.body(inp)

    with CAMExtractor(WithSpare(), ["body.layer1", "spare"]) as ex:
        with pytest.raises(RuntimeError, match=r"position\(s\) \[1\]"):
            ex(x, 0)


def test_matches_torchcam_multi_layer_smoothgradcampp():
    """torchcam 0.4's SmoothGradCAMpp also takes a list of layers and shares its noisy passes."""
    torchcam_methods = pytest.importorskip("torchcam.methods", reason="pip install --no-deps torchcam==0.4.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()
    x = torch.randn(6, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    cls = [0, 3, 1, 4, 2, 0]
    with torchcam_methods.SmoothGradCAMpp(model, target_layer=["1", "4"], num_samples=4, std=0.3) as tc:
        torch.manual_seed(123)
        expected = tc(cls, model(x))
    with CAMExtractor(model, ["1", "4"], num_samples=4, std=0.3) as ex:
        got = ex(x, cls, generator=torch.Generator().manual_seed(123))
    assert [tuple(g.shape) for g in got] == [(6, 16, 12), (6, 8, 6)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=1e-5, atol=1e-6)
