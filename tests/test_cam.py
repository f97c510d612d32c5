"""CAMExtractor (docs/ops.md, Grad-CAM, `CAMExtractor`) against a per-image loop written from docs/ops.md.

The oracle below does not use edfkern at all: one image at a time, a forward hook that
keeps the target layer's output, ``torch.autograd.grad`` of that image's logit, and the
the formulas of docs/ops.md for gradcam / gradcam++ / torchcam-0.4 smoothgradcam++. Both sides draw
the noise as the extractor documents it (one ``randn(images.shape) * std`` per noisy pass
from the same seeded generator), so maps are comparable. The model runs in float64 so the
comparison is tight even though batched and single-image convolutions round differently.
"""
import copy
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edfkern.baselines as B
from edfkern.cam import CAMExtractor, torchcam_noise

EPS = 1e-8


def small_convnet(num_classes=5, width=8, in_ch=3):
    torch.manual_seed(0)
    block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                            nn.AvgPool2d(2))
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(block(in_ch, width), block(width, 2 * width)))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.LazyLinear(num_classes))
    model(torch.zeros(1, in_ch, 16, 16))  # materialise the lazy layer
    # non-trivial BatchNorm statistics, so eval mode matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ----------------------------------------------------------------------------- the oracle


def loop_cams(model, layer, images, classes, method, num_samples=4, std=0.3, seed=0, size=None):
    """Per-image loop, written from docs/ops.md."""
    smooth = method == "smoothgradcam++"
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(images.shape, generator=gen, dtype=images.dtype) * std for _ in range(num_samples)] \
        if smooth else []
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    was_training = model.training
    model.eval()
    maps = []
    try:
        for i in range(images.shape[0]):
            x = images[i:i + 1].detach()
            c = int(classes[i])

            def act_and_grad(inp):
                out = model(inp)
                a = store["a"]
                (g,) = torch.autograd.grad(out[0, c], a)
                return a[0].detach(), g[0]

            if smooth:
                with torch.no_grad():
                    model(x)
                a_clean = store["a"][0].clone()
                gs, a_last = [], None
                for s in range(num_samples):
                    a_last, g = act_and_grad(x + noises[s][i:i + 1])
                    gs.append(g)
                gs = torch.stack(gs)
                d2, d3 = (gs ** 2).mean(0), (gs ** 3).mean(0)
                alpha = d2 / (2 * d2 + (a_clean * d3).sum(dim=(1, 2), keepdim=True) + EPS)
                w = (alpha * gs[-1].clamp_min(0)).sum(dim=(1, 2))
                a = a_last
            else:
                a, g = act_and_grad(x)
                if method == "gradcam":
                    w = g.mean(dim=(1, 2))
                else:
                    alpha = g ** 2 / (2 * g ** 2 + (a * g ** 3).sum(dim=(1, 2), keepdim=True) + EPS)
                    w = (alpha * g.clamp_min(0)).sum(dim=(1, 2))
            cam = (w[:, None, None] * a).sum(0).clamp_min(0)
            cam = cam - cam.min()
            cam = cam / (cam.max() + EPS)
            if size is not None:
                cam = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            maps.append(cam)
    finally:
        handle.remove()
        model.train(was_training)
    model.zero_grad(set_to_none=True)
    return torch.stack(maps)


def assert_close(actual, expected, atol=1e-9):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bad = (actual - expected).abs() > atol
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} mismatched; first at {idx}: "
                             f"{float(actual[idx])} vs {float(expected[idx])}; max diff "
                             f"{float((actual - expected).abs().max())}")


@pytest.fixture(scope="module")
def setup():
    model = small_convnet().double()
    torch.manual_seed(1)
    images = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    return model, images, classes


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "smoothgradcam++"])
@pytest.mark.parametrize("batch_size", [None, 3, 1])
def test_matches_per_image_loop(setup, method, batch_size):
    model, images, classes = setup
    expected = loop_cams(model, model.features[1], images, classes, method, num_samples=3, std=0.3, seed=5)
    with CAMExtractor(model, "features.1", method=method, num_samples=3, std=0.3, batch_size=batch_size) as ex:
        got = ex(images, classes, generator=torch.Generator().manual_seed(5))
    assert got.shape == (7, 4, 4)
    assert got.dtype == torch.float64
    assert_close(got, expected)
    assert float(got.amax()) > 0.5  # maps are non-trivial


def test_size_and_class_forms(setup):
    model, images, _ = setup
    expected = loop_cams(model, model.features[1], images, [2] * 7, "smoothgradcam++", seed=3, size=(16, 16))
    ex = CAMExtractor(model, model.features[1])  # module form, defaults num_samples=4, std=0.3
    for cls in (2, [2] * 7, torch.full((7,), 2), torch.tensor(2)):
        got = ex(images, cls, size=(16, 16), generator=torch.Generator().manual_seed(3))
        assert got.shape == (7, 16, 16)
        assert_close(got, expected)
    ex.close()


def test_float32_model_close_to_oracle():
    model = small_convnet()
    torch.manual_seed(2)
    images, classes = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 1])
    expected = loop_cams(model, model.features[1], images, classes, "smoothgradcam++", seed=0)
    with CAMExtractor(model, "features.1") as ex:
        got = ex(images, classes, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-4


def test_global_rng_is_used_without_generator(setup):
    model, images, classes = setup
    ex = CAMExtractor(model, "features.1", num_samples=2)
    torch.manual_seed(11)
    a = ex(images, classes)
    torch.manual_seed(11)
    b = ex(images, classes)
    c = ex(images, classes)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_inplace_relu_after_target_is_fine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3))
    with CAMExtractor(model, "0") as ex:
        out = ex(torch.randn(4, 3, 8, 8), [0, 1, 2, 0])
    assert out.shape == (4, 8, 8) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- model state


def _snapshot(model):
    return {
        "grad": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_same(before, after):
    assert before["req"] == after["req"]
    assert before["training"] == after["training"]
    for n, g in before["grad"].items():
        if g is None:
            assert after["grad"][n] is None, f"{n}.grad was created"
        else:
            assert torch.equal(g, after["grad"][n]), f"{n}.grad changed"
    for key in ("params", "buffers"):
        for n, t in before[key].items():
            assert torch.equal(t, after[key][n]), f"{key} {n} changed"


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["gradcam", "smoothgradcam++"])
def test_model_left_as_found(method):
    model = small_convnet()
    model.train()
    model.features[0].eval()  # mixed modes must come back exactly
    model.features[0][0].weight.requires_grad_(False)  # a frozen layer
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # an existing grad must not change
    images = torch.randn(5, 3, 16, 16, requires_grad=True)
    before = _snapshot(model)
    with CAMExtractor(model, "features.1", method=method, num_samples=2, batch_size=4) as ex:
        ex(images, [0, 1, 2, 3, 4])
        assert _hook_count(model) == 0  # hooks live only during a call
    _assert_same(before, _snapshot(model))
    assert images.grad is None


def test_model_left_as_found_when_frozen_and_under_no_grad():
    model = small_convnet()
    for p in model.parameters():
        p.requires_grad_(False)
    before = _snapshot(model)
    with torch.no_grad(), CAMExtractor(model, "features.1") as ex:
        out = ex(torch.randn(3, 3, 16, 16), 1)
        assert torch.is_grad_enabled() is False
    assert out.shape == (3, 4, 4) and float(out.amax()) > 0.5
    _assert_same(before, _snapshot(model))


def test_works_under_inference_mode(setup):
    model, images, classes = setup
    with CAMExtractor(model, "features.1", num_samples=2) as ex:
        expected = ex(images, classes, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            got = ex(images, classes, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, expected)


def test_hooks_removed_and_state_restored_on_error():
    model = small_convnet()
    model.train()
    before = _snapshot(model)
    ex = CAMExtractor(model, "features.1")
    with pytest.raises(ValueError, match="class_idx"):
        ex(torch.randn(2, 3, 16, 16), [0, 99])
    assert _hook_count(model) == 0
    _assert_same(before, _snapshot(model))
    assert torch.is_grad_enabled()


def test_close_and_context_manager():
    model = small_convnet()
    ex = CAMExtractor(model, "features.1")
    ex(torch.randn(2, 3, 16, 16), 0)
    ex.close()
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        ex(torch.randn(2, 3, 16, 16), 0)
    with CAMExtractor(model, "features.1") as ex2:
        ex2(torch.randn(2, 3, 16, 16), 0)
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        ex2(torch.randn(2, 3, 16, 16), 0)


def test_bad_arguments():
    model = small_convnet()
    with pytest.raises(ValueError, match="target_layer"):
        CAMExtractor(model, "features.9")
    with pytest.raises(ValueError, match="submodule"):
        CAMExtractor(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="method"):
        CAMExtractor(model, "features.1", method="scorecam")
    with pytest.raises(ValueError, match="num_samples"):
        CAMExtractor(model, "features.1", num_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        CAMExtractor(model, "features.1", batch_size=0)
    ex = CAMExtractor(model, "features.1")
    with pytest.raises(ValueError, match="N=3"):
        ex(torch.randn(3, 3, 16, 16), [0, 1])
    with pytest.raises(TypeError, match="integer"):
        ex(torch.randn(3, 3, 16, 16), torch.zeros(3))


# ----------------------------------------------------------------------------- EDF's soft labels


@pytest.mark.parametrize("method", ["gradcam", "smoothgradcam++"])
def test_soft_labels_give_the_maps_of_their_argmax(setup, method):
    """EDF learns ``label_syn`` as (N, K) floats and explains ``label_syn.argmax(dim=-1)``."""
    model, images, _ = setup
    soft = torch.randn(7, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    soft[2] = torch.tensor([0.5, 3.0, 3.0, -1.0, 0.0])  # a tie: argmax takes the first maximum, class 1
    soft.requires_grad_(True)  # as EDF's label_syn, trained by its own optimizer
    hard = soft.detach().argmax(dim=-1)
    assert int(hard[2]) == 1
    with CAMExtractor(model, "features.1", method=method, num_samples=3) as ex:
        got = ex(images, soft, generator=torch.Generator().manual_seed(9))
        expected = ex(images, hard, generator=torch.Generator().manual_seed(9))
        assert torch.equal(got, expected)
        assert not torch.equal(got, ex(images, (hard + 1) % 5, generator=torch.Generator().manual_seed(9)))
        assert torch.equal(ex(images, soft.double(), size=(16, 16), generator=torch.Generator().manual_seed(1)),
                           ex(images, hard, size=(16, 16), generator=torch.Generator().manual_seed(1)))
    assert soft.grad is None and soft.requires_grad


def test_soft_label_errors():
    model = small_convnet()
    images = torch.randn(6, 3, 16, 16)
    ex = CAMExtractor(model, "features.1")
    soft = torch.randn(6, 5)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        bad = soft.clone()
        bad[4, 2] = bad_value
        with pytest.raises(ValueError, match=r"soft label row 4 is not finite"):
            ex(images, bad)
    bad = soft.clone()
    bad[[1, 3], 0] = float("nan")
    with pytest.raises(ValueError, match=r"row 1 .*non-finite rows: 1, 3"):
        ex(images, bad)
    with pytest.raises(ValueError, match=r"N=6"):
        ex(images, torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"K >= 1"):
        ex(images, torch.randn(6, 0))
    with pytest.raises(ValueError, match=r"K = the model's 5 outputs, got K=4"):
        ex(images, torch.randn(6, 4))
    with pytest.raises(TypeError, match=r"integer dtype, or be \(N, K\) floating soft labels"):
        ex(images, torch.zeros(6))  # 1-D floats are not class indices
    assert _hook_count(model) == 0


# ----------------------------------------------------------------------------- EDF's torchcam noise order


def _torchcam_methods():
    if os.environ.get("CI"):  # CI installs torchcam (the README's test command): a missing one must fail there
        import torchcam.methods as methods
        return methods
    return pytest.importorskip("torchcam.methods", reason="pip install --no-deps torchcam==0.4.0")


def edf_get_activation_maps(model, layer, image_syn, label_syn, num_classes, ipc):
    """EDF's ``utils/gradcam.py`` ``get_activation_maps`` loop, CPU, before its resize: per class a
    ``DataLoader`` over a ``TensorDataset`` and one torchcam ``SmoothGradCAMpp`` call per batch."""
    methods = _torchcam_methods()
    cam_extractor = methods.SmoothGradCAMpp(model=model, target_layer=[layer])
    activation_maps_all = []
    try:
        for c in range(num_classes):
            image_syn_c = image_syn[c * ipc: (c + 1) * ipc]
            label_syn_c = label_syn[c * ipc: (c + 1) * ipc]
            dataset = TensorDataset(copy.deepcopy(image_syn_c.detach()), copy.deepcopy(label_syn_c.detach()))
            batch_size = ipc if ipc <= 50 else 32
            for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                outputs = model(images)
                activation_maps_all.extend(cam_extractor(labels.argmax(dim=-1).tolist(), outputs)[0])
    finally:
        cam_extractor.remove_hooks()
    return torch.stack(activation_maps_all, dim=0)


@pytest.mark.parametrize("num_classes,ipc", [(3, 4), (2, 70)])  # 70: loader batches of 32, 32 and 6
def test_torchcam_noise_reproduces_edf_maps_draw_for_draw(num_classes, ipc):
    model = small_convnet(num_classes=num_classes + 2).eval()
    gen = torch.Generator().manual_seed(3)
    image_syn = torch.randn(num_classes * ipc, 3, 16, 16, generator=gen)
    label_syn = torch.randn(num_classes * ipc, num_classes + 2, generator=gen)  # EDF's learned soft labels
    label_syn[:, :num_classes] += 4 * torch.eye(num_classes).repeat_interleave(ipc, dim=0)
    torch.manual_seed(123)  # the global RNG where EDF's per-class loop starts
    expected = edf_get_activation_maps(model, model.features[1], image_syn, label_syn, num_classes, ipc)
    noise = torchcam_noise(image_syn.shape, ipc, generator=torch.Generator().manual_seed(123))
    assert noise.shape == (4,) + tuple(image_syn.shape) and noise.dtype == torch.float32
    with CAMExtractor(model, model.features[1]) as ex:
        got = ex(image_syn, label_syn, noise=noise)
        # float32 round-off only: torchcam's per-batch convolutions round differently from the batched ones
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4
        # the order matters: CAMExtractor's own draws from the same seed are not EDF's
        other = ex(image_syn, label_syn, generator=torch.Generator().manual_seed(123))
    assert (other - expected).abs().max() > 1e-3
    # with no generator, the helper draws from (and advances) the global RNG, as EDF's loop does
    torch.manual_seed(123)
    assert torch.equal(torchcam_noise(image_syn.shape, ipc), noise)


def test_torchcam_noise_layout_and_errors():
    g = torch.Generator().manual_seed(0)
    noise = torchcam_noise((6, 1, 2, 2), 3, num_samples=2, loader_batch_size=2, generator=g,
                           dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    want = torch.empty(2, 6, 1, 2, 2)
    for c0 in (0, 3):  # per class: the loader's seed draw, then per batch of <= 2 images, one draw per pass
        torch.empty((), dtype=torch.int64).random_(generator=g)
        for r0, r1 in ((c0, c0 + 2), (c0 + 2, c0 + 3)):
            for s in range(2):
                want[s, r0:r1] = torch.randn(r1 - r0, 1, 2, 2, generator=g)
    assert noise.dtype == torch.float64 and torch.equal(noise, want.double())
    with pytest.raises(ValueError, match="divisible by ipc"):
        torchcam_noise((7, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="shape"):
        torchcam_noise((6, 2, 2), 3)
    with pytest.raises(TypeError, match="shape"):
        torchcam_noise(torch.zeros(6, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="ipc"):
        torchcam_noise((6, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="num_samples"):
        torchcam_noise((6, 1, 2, 2), 3, num_samples=0)
    with pytest.raises(ValueError, match="loader_batch_size"):
        torchcam_noise((6, 1, 2, 2), 3, loader_batch_size=0)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        torchcam_noise((6, 1, 2, 2), 3, generator=0)


# ----------------------------------------------------------------------------- speed


def _best_of(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_batched_faster_than_per_class_loop():
    """CAMExtractor against EDF's per-class loop (``edfkern.baselines.cams_per_class``): the same maps
    from the same noise draws, and faster."""
    model = small_convnet(num_classes=10, width=8)
    ipc = 10
    images = torch.randn(10 * ipc, 3, 16, 16)
    labels = torch.arange(10).repeat_interleave(ipc)
    layer = model.features[1]
    ex = CAMExtractor(model, "features.1")
    # same maps from the same noise (a check that the loop computes the same thing)
    maps_loop = B.cams_per_class(model, layer, images, ipc, generator=torch.Generator().manual_seed(5))
    maps_ex = ex(images, labels, generator=torch.Generator().manual_seed(5))
    assert maps_loop.shape == maps_ex.shape == (100, 4, 4)
    assert (maps_loop - maps_ex).abs().max() < 1e-4
    assert float(maps_loop.amax()) > 0.5  # maps are non-trivial
    ex(images, labels)  # warm-up
    B.cams_per_class(model, layer, images, ipc)
    t_batched = _best_of(lambda: ex(images, labels))
    t_loop = _best_of(lambda: B.cams_per_class(model, layer, images, ipc))
    print(f"batched {t_batched * 1e3:.2f} ms vs per-class loop {t_loop * 1e3:.2f} ms ({t_loop / t_batched:.1f}x)")
    assert t_batched < t_loop
