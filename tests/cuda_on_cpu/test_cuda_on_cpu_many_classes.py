"""More classes than one launch's gridDim.y / gridDim.z (65,535) holds.

``local_covariance`` allows up to ``max(N, 65536)`` classes (most of them empty), and a loss on
more than 65,535 rows may have as many classes. The kernels with one block row per class
(``seg_mean``, ``cc_forward``'s squares, ``cov_forward``'s Gram) launch the classes in chunks;
before that, K = 65,536 failed the launch with CUDA's invalid-configuration error.
"""
from __future__ import annotations

import pytest
import torch

import edfkern.reference as R
from shim_kernels import kernels

pytestmark = pytest.mark.cuda_on_cpu

K_CLASSES = 65_536 + 3


def _groups(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows in ``K_CLASSES`` classes: a few rows in classes on both sides of 65,535, the rest empty."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 65_534, 65_535, 65_536, K_CLASSES - 1])[torch.randint(0, 6, (n,), generator=g)]
    order = torch.sort(labels, stable=True)
    counts = torch.bincount(labels, minlength=K_CLASSES)
    offsets = torch.zeros(K_CLASSES + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return order.indices.contiguous(), offsets


def test_more_classes_than_a_grid_dimension():
    k = kernels(orders=["forward"])  # one order: 65,539 blocks per launch
    perm, offsets = _groups(24, seed=0)
    x = torch.rand(24, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    close = dict(rtol=1e-12, atol=1e-12)
    for got, exp in zip(k.cov_forward(x, perm, offsets), R.cov_forward(x, perm, offsets)):
        torch.testing.assert_close(got, exp, **close)
    flat = x.reshape(24, 6)
    torch.testing.assert_close(k.seg_mean(flat, perm, offsets), R.seg_mean(flat, perm, offsets), **close)
    torch.testing.assert_close(k.cc_forward(flat, perm, offsets)[0], R.cc_forward(flat, perm, offsets)[0], **close)
