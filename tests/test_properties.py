"""Hypothesis property tests over random shapes, on every available backend."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edfkern
from tests.conftest import DEVICE, all_backend_params
from tests.test_covariance import oracle_cov

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", all_backend_params())
@SETTINGS
@given(p=st.integers(1, 300), ratio=st.floats(0, 0.999), n_values=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_cpd_keep_mask_is_a_stable_sort(name, p, ratio, n_values, seed):
    rng = np.random.default_rng(seed)
    l = torch.from_numpy(rng.integers(0, n_values, p).astype(np.float32) * 0.125)
    with edfkern.use_backend(name):
        keep = edfkern.cpd_keep_mask(l.to(DEVICE), ratio).cpu()
    k = int(math.floor(ratio * p))
    order = np.argsort(l.numpy(), kind="stable")
    exp = np.ones(p, bool)
    exp[order[:k]] = False
    assert np.array_equal(keep.numpy(), exp)


@pytest.mark.parametrize("name", all_backend_params())
@SETTINGS
@given(n=st.integers(1, 12), c=st.integers(1, 9), l=st.integers(1, 11), k=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_local_covariance_properties(name, n, c, l, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, l, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    shift = torch.randn(k, c, l, generator=g, dtype=torch.float64)
    with edfkern.use_backend(name):
        sigma = edfkern.local_covariance(x.to(DEVICE), groups=labels.to(DEVICE), num_groups=k).cpu()
        perm = torch.randperm(n, generator=g)
        sigma_perm = edfkern.local_covariance(x[perm].to(DEVICE), groups=labels[perm].to(DEVICE), num_groups=k).cpu()
        sigma_shift = edfkern.local_covariance((x + shift[labels]).to(DEVICE), groups=labels.to(DEVICE),
                                               num_groups=k).cpu()
    torch.testing.assert_close(sigma, oracle_cov(x, labels, k), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sigma, sigma.transpose(1, 2), rtol=0, atol=1e-12)   # symmetric
    assert torch.linalg.eigvalsh(sigma).min() >= -1e-9                               # PSD
    torch.testing.assert_close(sigma_perm, sigma, rtol=1e-9, atol=1e-10)             # row order is irrelevant
    torch.testing.assert_close(sigma_shift, sigma, rtol=1e-7, atol=1e-8)             # per-class shift invariance


@pytest.mark.parametrize("name", all_backend_params())
@SETTINGS
@given(n=st.integers(1, 6), h=st.integers(1, 6), w=st.integers(1, 6), H=st.integers(1, 24), W=st.integers(1, 24),
       beta=st.floats(0, 3), seed=st.integers(0, 2**31 - 1))
def test_dae_mask_values_are_one_or_map_plus_beta(name, n, h, w, H, W, beta, seed):
    g = torch.Generator().manual_seed(seed)
    cam = torch.rand(n, h, w, generator=g)
    with edfkern.use_backend(name):
        m = edfkern.dae_mask(cam.to(DEVICE), beta=beta, size=(H, W)).cpu()[:, 0]
    up = torch.nn.functional.interpolate(cam[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    is_one = (m - 1).abs() <= 1e-6
    is_up = (m - (up + beta)).abs() <= 1e-5
    assert bool((is_one | is_up).all())
    # every map keeps its maximum (it is >= its own mean), unless the map is flat to within rounding
    top = up.flatten(1).argmax(1)
    clear = up.flatten(1).max(1).values > up.flatten(1).mean(1) + 1e-4
    got_top = m.flatten(1)[torch.arange(n), top]
    assert torch.allclose(got_top[clear], up.flatten(1)[torch.arange(n), top][clear] + beta, atol=1e-5)


@pytest.mark.parametrize("name", all_backend_params())
@SETTINGS
@given(n=st.integers(1, 10), d=st.integers(1, 20), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_class_centralization_properties(name, n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k if n >= k else torch.arange(n)
    kk = int(labels.max()) + 1
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    centre = torch.randn(kk, d, generator=g, dtype=torch.float64)
    with edfkern.use_backend(name):
        loss = edfkern.class_centralization_loss(f.to(DEVICE), groups=labels.to(DEVICE)).cpu()
        collapsed = edfkern.class_centralization_loss(centre[labels].to(DEVICE), groups=labels.to(DEVICE)).cpu()
    assert loss >= 0
    assert abs(float(collapsed)) <= 1e-12
