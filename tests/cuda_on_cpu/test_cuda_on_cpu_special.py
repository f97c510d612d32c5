"""Special values on the CUDA source run on the CPU: NaN and +-inf placed away from lane 0 (and off
the first block), and flat CAMs, against edfkern.reference with the rules of
tests/test_special_values.py (NaN and infinities exactly where the reference has them; the finite
entries loosely, their accuracy is the contract tests' business)."""
from __future__ import annotations

import pytest
import torch

import edfkern.reference as R
from tests._utils import DTYPES, assert_same_special

pytestmark = pytest.mark.cuda_on_cpu

INF, NAN = float("inf"), float("nan")


def _rand(*shape, dtype, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [None, 0.4], ids=["mean", "fixed"])
def test_dae_special_and_flat(K, dtype, threshold):
    cam = _rand(4, 5, 7, dtype=dtype, seed=1)
    cam[0, 3, 5] = NAN  # flat index 26: lane 26 of the image's block
    cam[1, 4, 6] = INF
    cam[2, 2, 3] = -INF
    cam[3] = 0.625  # flat: U(cam) is the constant, its own mean
    got, exp = K.dae_mask(cam, 1.5, threshold, 37, 41), R.dae_mask(cam, 1.5, threshold, 37, 41)
    grad = _rand(4, 3, 37, 41, dtype=dtype, seed=2)
    g1, g2 = grad.clone(), grad.clone()
    K.dae_(g1, cam, 1.5, threshold)
    R.dae_(g2, cam, 1.5, threshold)
    # a fixed threshold leaves the finite pixels of images 0-2 free to flip at 0.4: there, only where
    # NaN and inf land is compared; the flat image and (with the mean threshold, NaN or inf) all of it
    whole = [0, 1, 2, 3] if threshold is None else [3]
    assert_same_special(got[whole], exp[whole], dtype, "dae_mask")
    assert_same_special(g1[whole], g2[whole], dtype, "dae_")
    for a, b, name in ((got, exp, "dae_mask"), (g1, g2, "dae_")):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), f"{name}: special positions"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_grad_cam_special(K, dtype, method):
    A = _rand(3, 37, 5, 6, dtype=dtype, seed=3)
    G = _rand(3, 37, 5, 6, dtype=dtype, seed=4) - 0.5
    G[1, 33, 4, 5] = NAN  # channel 33 (a lane of the second warp), last position
    A[2, 20, 3, 1] = INF
    for normalize in (True, False):
        got = K.grad_cam(A, G, None, method, normalize, (9, 11))
        assert_same_special(got, R.grad_cam(A, G, None, method, normalize, (9, 11)), dtype, method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpd_special(K, dtype):
    p = 5000  # two tie-count chunks, 20 blocks
    l = _rand(p, dtype=dtype, seed=5)
    l[[37, 300, 4099]] = NAN
    l[[1000, 4500]] = INF
    l[[77, 2222]] = -INF
    for k in (1, 2, 2500, 4995, 4999):
        assert torch.equal(K.cpd_keep_mask(l, k), R.cpd_keep_mask(l, k)), f"k={k}"
    s, t, s0 = _rand(p, dtype=dtype, seed=6), _rand(p, dtype=dtype, seed=7), _rand(p, dtype=dtype, seed=8)
    s[[45, 3000]] = NAN
    t[4321] = INF
    for k in (0, 1000, 4996):
        got, exp = K.cpd_forward(s, t, s0, k), R.cpd_forward(s, t, s0, k)
        assert torch.equal(got[2], exp[2]) or (got[2].isnan() and exp[2].isnan()), f"k={k}: thr"
        assert torch.equal(got[3], exp[3]), f"k={k}: tie"
        assert_same_special(got[0], exp[0], dtype, f"k={k}: sum_l")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_features_and_covariance_special(K, dtype):
    x = _rand(9, 300, dtype=dtype, seed=9)
    x[4, 200] = INF  # column 200: the second block of columns
    x[7, 45] = NAN
    offsets = torch.tensor([0, 3, 3, 9])
    perm = torch.tensor([8, 0, 5, 1, 2, 3, 4, 6, 7])
    assert_same_special(K.seg_mean(x, perm, offsets), R.seg_mean(x, perm, offsets), dtype, "seg_mean")
    for got, exp, name in zip(K.cc_forward(x, perm, offsets), R.cc_forward(x, perm, offsets), ("sq", "mean")):
        assert_same_special(got, exp, dtype, f"cc_forward {name}")
    xc = _rand(9, 20, 3, dtype=dtype, seed=10)
    xc[5, 17, 2] = NAN
    for got, exp, name in zip(K.cov_forward(xc, perm, offsets), R.cov_forward(xc, perm, offsets), ("sigma", "mean")):
        assert_same_special(got, exp, dtype, f"cov_forward {name}")
