"""Class centralization and mean matching (docs/ops.md) against baselines and fp64 oracles."""
from __future__ import annotations

import pytest
import torch

import edfkern
from edfkern import baselines
from tests._utils import DTYPES, assert_formula, assert_fp_rule, noncontig, rand
from tests.test_covariance import labels_for


def oracle_cc(f, lab, k, w, dtype=torch.float64):
    """(loss, grad) one class at a time, computed in ``dtype`` (float64: the oracle)."""
    f = f.to(dtype).reshape(f.shape[0], -1)
    loss, grad = torch.zeros((), dtype=dtype), torch.zeros_like(f)
    for c in range(k):
        idx = (lab == c).nonzero()[:, 0]
        fc = f[idx] - f[idx].mean(0)
        loss += (fc ** 2).sum()
        grad[idx] = 2 * w * fc
    return w * loss, grad


def oracle_dm(s, r, ls, lr, k, w, dtype=torch.float64):
    """(loss, grad of syn) one class at a time, computed in ``dtype`` (float64: the oracle)."""
    s, r = s.to(dtype).reshape(s.shape[0], -1), r.to(dtype).reshape(r.shape[0], -1)
    loss, gs = torch.zeros((), dtype=dtype), torch.zeros_like(s)
    for c in range(k):
        i_s, i_r = (ls == c).nonzero()[:, 0], (lr == c).nonzero()[:, 0]
        d = r[i_r].mean(0) - s[i_s].mean(0)
        loss += (d ** 2).sum()
        gs[i_s] = -2 * w * d / len(i_s)
    return w * loss, gs


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (12, 512, 4), (30, 33, 10)], ids=str)
@pytest.mark.parametrize("group_form", ["int", "labels"])
def test_class_centralization(backend, device, shape, group_form):
    n, d, k = shape
    n = n if group_form == "labels" else n - n % k
    g = torch.Generator().manual_seed(n + d)
    f = rand(n, d, gen=g)
    lab = labels_for(n, k, g, contiguous=group_form == "int")
    groups = k if group_form == "int" else lab.to(device)
    fd = f.to(device, copy=True).requires_grad_()
    loss = edfkern.class_centralization_loss(fd, groups=groups, weight=0.01)
    loss.backward()
    assert_formula(loss.cpu(), lambda dt: oracle_cc(f, lab, k, 0.01, dt)[0], "loss")
    assert_formula(fd.grad.cpu(), lambda dt: oracle_cc(f, lab, k, 0.01, dt)[1], "grad")
    exp_loss, exp_grad = oracle_cc(f, lab, k, 0.01)
    fb = f.clone().requires_grad_()
    bl = baselines.class_centralization_loss(fb, groups=k if group_form == "int" else lab, weight=0.01)
    bl.backward()
    assert_fp_rule(loss.cpu(), exp_loss, bl.detach(), "loss vs the baseline's error")
    assert_fp_rule(fd.grad.cpu(), exp_grad, fb.grad, "grad vs the baseline autograd's error")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_centralization_dtypes_and_shapes(backend, device, dtype):
    g = torch.Generator().manual_seed(2)
    f = rand(8, 3, 2, 2, dtype=dtype, gen=g)  # flattened per row to (8, 12)
    fd = f.to(device, copy=True).requires_grad_()
    loss = edfkern.class_centralization_loss(fd, groups=4)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fd.grad.shape == f.shape and fd.grad.dtype == dtype
    lab = torch.arange(8) // 2
    assert_formula(loss.cpu(), lambda dt: oracle_cc(f, lab, 4, 0.05, dt)[0], "loss")
    assert_formula(fd.grad.cpu().reshape(8, -1), lambda dt: oracle_cc(f, lab, 4, 0.05, dt)[1], "grad")


def test_class_centralization_noncontiguous_and_gradcheck(backend, device):
    g = torch.Generator().manual_seed(3)
    f = rand(9, 6, dtype=torch.float64, gen=g).to(device)
    lab = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1], device=device)
    a = edfkern.class_centralization_loss(noncontig(f), groups=lab)
    b = edfkern.class_centralization_loss(f, groups=lab)
    assert torch.equal(a, b), "non-contiguous input must give the contiguous result exactly"
    assert torch.autograd.gradcheck(lambda v: edfkern.class_centralization_loss(v, groups=lab, weight=0.3),
                                    (f.clone().requires_grad_(),))


@pytest.mark.parametrize("group_form", ["int", "labels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mean_matching(backend, device, group_form, dtype):
    g = torch.Generator().manual_seed(4)
    k = 3
    s, r = rand(9, 17, dtype=dtype, gen=g), rand(12, 17, dtype=dtype, gen=g)
    ls, lr = labels_for(9, k, g, group_form == "int"), labels_for(12, k, g, group_form == "int")
    sg, rg = (k, k) if group_form == "int" else (ls.to(device), lr.to(device))
    sd = s.to(device, copy=True).requires_grad_()
    loss = edfkern.mean_matching_loss(sd, r.to(device), syn_groups=sg, real_groups=rg, weight=2.0)
    loss.backward()
    assert_formula(loss.cpu(), lambda dt: oracle_dm(s, r, ls, lr, k, 2.0, dt)[0], "loss")
    assert_formula(sd.grad.cpu(), lambda dt: oracle_dm(s, r, ls, lr, k, 2.0, dt)[1], "grad")
    if dtype == torch.float32:
        bl = baselines.mean_matching_loss(s, r, syn_groups=k if group_form == "int" else ls,
                                          real_groups=k if group_form == "int" else lr, weight=2.0)
        assert_fp_rule(loss.cpu(), oracle_dm(s, r, ls, lr, k, 2.0)[0], bl, "loss vs the baseline's error")


def test_mean_matching_gradcheck(backend, device):
    g = torch.Generator().manual_seed(5)
    s = rand(6, 4, dtype=torch.float64, gen=g).to(device).requires_grad_()
    r = rand(5, 4, dtype=torch.float64, gen=g).to(device).requires_grad_()
    lr = torch.tensor([0, 1, 1, 0, 1], device=device)
    assert torch.autograd.gradcheck(
        lambda a, b: edfkern.mean_matching_loss(a, b, syn_groups=2, real_groups=lr), (s, r))


def test_feature_losses_bad_inputs():
    f = torch.randn(6, 4)
    with pytest.raises(ValueError, match="group 2 is empty"):
        edfkern.class_centralization_loss(f, groups=torch.tensor([0, 0, 1, 1, 3, 3]))
    with pytest.raises(ValueError, match="feat must have shape"):
        edfkern.class_centralization_loss(f[:0], groups=1)
    with pytest.raises(TypeError, match="feat"):
        edfkern.class_centralization_loss(f.long(), groups=2)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        edfkern.class_centralization_loss(f, groups=4)
    with pytest.raises(TypeError, match="weight"):
        edfkern.class_centralization_loss(f, groups=2, weight=None)
    with pytest.raises(ValueError, match="same feature size D"):
        edfkern.mean_matching_loss(f, torch.randn(6, 5), syn_groups=2, real_groups=2)
    with pytest.raises(ValueError, match="group 1 is empty on the syn side"):
        edfkern.mean_matching_loss(f, f, syn_groups=torch.zeros(6, dtype=torch.long), real_groups=2)
