"""grad_cam (docs/ops.md) on every backend, against edfkern.baselines and an fp64 oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import edfkern
from edfkern import baselines
from tests._utils import ACC_TOL, DTYPES, assert_close, assert_within_torch_error, noncontig, rand

EPS = 1e-8


def oracle(A, G, method, size=None, normalize=True, A_clean=None):
    """Straight from the formula in docs/ops.md, in fp64."""
    A, G = A.double(), G.double()
    if method == "gradcam":
        w = G.mean(dim=(-2, -1))
    elif method == "gradcam++":
        alpha = G ** 2 / (2 * G ** 2 + (A * G ** 3).sum(dim=(-2, -1), keepdim=True) + EPS)
        w = (alpha * G.clamp_min(0)).sum(dim=(-2, -1))
    else:
        d2, d3 = (G ** 2).mean(0), (G ** 3).mean(0)
        alpha = d2 / (2 * d2 + (A_clean.double() * d3).sum(dim=(-2, -1), keepdim=True) + EPS)
        A, G = A[-1], G[-1]
        w = (alpha * G.clamp_min(0)).sum(dim=(-2, -1))
    cam = (w[:, :, None, None] * A).sum(1).clamp_min(0)
    if normalize:
        cam = cam - cam.flatten(1).min(1).values[:, None, None]
        cam = cam / (cam.flatten(1).max(1).values[:, None, None] + EPS)
    if size is not None:
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return cam


# (S, N, C, h, w)
SHAPES = [(1, 1, 1, 1, 1), (3, 5, 7, 4, 4), (2, 2, 13, 3, 5), (4, 3, 64, 7, 6)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s, n, c, h, w = shape
    return rand(s, n, c, h, w, dtype=dtype, gen=g), rand(s, n, c, h, w, dtype=dtype, gen=g), rand(n, c, h, w, dtype=dtype, gen=g)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "smoothgradcam++"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("size", [None, (17, 11)], ids=str)
def test_grad_cam_matches_oracle_and_baseline(backend, device, method, shape, size):
    A, G, Ac = _inputs(shape, torch.float32, seed=sum(shape))
    if method != "smoothgradcam++":
        A, G, Ac = A[0], G[0], None
    kw = dict(method=method, size=size, clean_activations=None if Ac is None else Ac.to(device))
    got = edfkern.grad_cam(A.to(device), G.to(device), **kw)
    assert got.dtype == torch.float32
    exp = oracle(A, G, method, size, A_clean=Ac)
    base = baselines.grad_cam(A, G, method=method, size=size, clean_activations=Ac)
    assert_within_torch_error(got.cpu(), base, exp, 1e-5, 1e-6, f"{method} vs fp64")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "smoothgradcam++"])
def test_grad_cam_dtypes_unnormalised(backend, device, dtype, method):
    A, G, Ac = _inputs((3, 4, 6, 5, 3), dtype, seed=11)
    if method != "smoothgradcam++":
        A, G, Ac = A[0], G[0], None
    got = edfkern.grad_cam(A.to(device), G.to(device), method=method, normalize=False,
                           clean_activations=None if Ac is None else Ac.to(device))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exp = oracle(A, G, method, normalize=False, A_clean=Ac)
    if dtype == torch.float64:
        assert_close(got.cpu(), exp, *ACC_TOL[dtype], name=str(dtype))
    else:  # low-precision inputs accumulate in fp32: compare with torch's fp32 on the same rounded values
        base = baselines.grad_cam(A.float(), G.float(), method=method, normalize=False,
                                  clean_activations=None if Ac is None else Ac.float())
        assert_within_torch_error(got.cpu(), base, exp, 1e-5, 1e-6, str(dtype))


def test_grad_cam_noncontiguous(backend, device):
    A, G, _ = _inputs((1, 3, 5, 4, 6), torch.float32, seed=12)
    a, g = A[0].to(device), G[0].to(device)
    exp = edfkern.grad_cam(a, g, method="gradcam++")
    got = edfkern.grad_cam(noncontig(a), noncontig(g), method="gradcam++")
    assert_close(got, exp, 0, 0, "non-contiguous")


def test_grad_cam_bad_inputs():
    A = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="method"):
        edfkern.grad_cam(A, A, method="scorecam")
    with pytest.raises(ValueError, match="gradients"):
        edfkern.grad_cam(A, A[:, :2])
    with pytest.raises(ValueError, match="activations"):
        edfkern.grad_cam(A[0], A[0])
    with pytest.raises(TypeError, match="gradients"):
        edfkern.grad_cam(A, A.double())
    with pytest.raises(TypeError, match="activations"):
        edfkern.grad_cam(A.int(), A.int())
    with pytest.raises(ValueError, match="clean_activations"):
        edfkern.grad_cam(A[None], A[None], method="smoothgradcam++")
    with pytest.raises(ValueError, match="clean_activations"):
        edfkern.grad_cam(A, A, clean_activations=A)
    with pytest.raises(ValueError, match="clean_activations"):
        edfkern.grad_cam(A[None], A[None], method="smoothgradcam++", clean_activations=A[:1])
    with pytest.raises(ValueError, match="size"):
        edfkern.grad_cam(A, A, size=(4, -1))
    with pytest.raises(ValueError, match="device"):
        edfkern.grad_cam(A, A.to("meta"))


def test_grad_cam_normalised_range(backend, device):
    A, G, _ = _inputs((1, 6, 8, 5, 5), torch.float32, seed=13)
    cam = edfkern.grad_cam(A[0].abs().to(device), G[0].to(device))
    flat = cam.flatten(1)
    assert torch.all(flat.min(1).values == 0)
    assert torch.all(flat.max(1).values <= 1)
