"""Local covariance and covariance matching (docs/ops.md) against baselines and fp64 oracles."""
from __future__ import annotations

import pytest
import torch

import edfkern
from edfkern import baselines
from tests._utils import DTYPES, assert_formula, assert_fp_rule, noncontig, rand


def oracle_cov(x: torch.Tensor, labels: torch.Tensor, k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One class at a time, as the definition reads (sum of centred outer products / n_k), computed in
    ``dtype``: float64 is the oracle, float32 the plain-PyTorch yardstick of the tolerance rule."""
    x = x.to(dtype).reshape(x.shape[0], x.shape[1], -1)
    out = torch.zeros(k, x.shape[1], x.shape[1], dtype=dtype)
    for c in range(k):
        xk = x[labels == c]
        if len(xk):
            xc = xk - xk.mean(0)
            out[c] = torch.einsum("icl,idl->cd", xc, xc) / len(xk)
    return out


def labels_for(n: int, k: int, gen, contiguous: bool) -> torch.Tensor:
    """Every class present; shuffled when not contiguous."""
    lab = torch.arange(n) % k
    if contiguous:
        return lab.sort().values
    return lab[torch.randperm(n, generator=gen)]


# (N, C, L, K)
SHAPES = [(1, 1, 1, 1), (6, 5, 7, 3), (12, 3, 16, 4), (10, 33, 9, 2), (9, 8, 1, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_form", ["int", "labels"])
def test_local_covariance(backend, device, shape, group_form):
    n, c, l, k = shape
    g = torch.Generator().manual_seed(n * c + l)
    x = rand(n, c, l, gen=g)
    lab = labels_for(n, k, g, contiguous=group_form == "int")
    groups = k if group_form == "int" else lab.to(device)
    got = edfkern.local_covariance(x.to(device), groups=groups)
    assert got.shape == (k, c, c) and got.dtype == torch.float32
    assert_formula(got.cpu(), lambda dt: oracle_cov(x, lab, k, dt), "vs fp64")
    base = baselines.local_covariance(x, groups=k if group_form == "int" else lab)
    assert_fp_rule(got.cpu(), oracle_cov(x, lab, k), base, "vs the baseline's error")
    base64 = baselines.local_covariance(x.double(), groups=k if group_form == "int" else lab)
    torch.testing.assert_close(base64, oracle_cov(x, lab, k), rtol=1e-10, atol=1e-12)  # the baseline is the formula


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_local_covariance_dtypes(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    x = rand(12, 6, 5, dtype=dtype, gen=g)
    got = edfkern.local_covariance(x.to(device), groups=3)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_formula(got.cpu(), lambda dt: oracle_cov(x, torch.arange(12) // 4, 3, dt), str(dtype))


def test_local_covariance_layouts_and_empty_group(backend, device):
    g = torch.Generator().manual_seed(2)
    x4 = rand(8, 3, 4, 5, gen=g)
    lab = torch.tensor([0, 2, 2, 0, 3, 3, 0, 2])  # group 1 empty
    got = edfkern.local_covariance(x4.to(device), groups=lab.to(device))
    assert got.shape == (4, 3, 3)
    assert torch.equal(got[1].cpu(), torch.zeros(3, 3))
    assert_formula(got.cpu(), lambda dt: oracle_cov(x4, lab, 4, dt), "4-D input")
    x2 = rand(8, 6, gen=g)
    got = edfkern.local_covariance(x2.to(device), groups=2, num_groups=None)
    assert_formula(got.cpu(), lambda dt: oracle_cov(x2[:, :, None], torch.arange(8) // 4, 2, dt), "2-D input")
    got = edfkern.local_covariance(noncontig(x4.flatten(2).to(device)), groups=lab.to(device), num_groups=6)
    assert got.shape == (6, 3, 3)
    assert torch.equal(got[4:].cpu(), torch.zeros(2, 3, 3))
    assert_formula(got.cpu()[:4], lambda dt: oracle_cov(x4, lab, 4, dt), "non-contiguous, num_groups")


def test_local_covariance_gradcheck(backend, device):
    g = torch.Generator().manual_seed(3)
    x = rand(7, 4, 3, dtype=torch.float64, gen=g).to(device).requires_grad_()
    lab = torch.tensor([1, 0, 1, 2, 0, 1, 2], device=device)
    assert torch.autograd.gradcheck(lambda v: edfkern.local_covariance(v, groups=lab), (x,))


# ----------------------------------------------------------------------------- covariance matching


def oracle_cm(syn, real, lab_s, lab_r, k, weight, dtype=torch.float64):
    d = oracle_cov(real, lab_r, k, dtype) - oracle_cov(syn, lab_s, k, dtype)
    return weight * (d ** 2).sum()


def oracle_cm_grad(syn, real, lab_s, lab_r, k, weight, dtype=torch.float64):
    """The analytic gradient 4w/n_k (S_syn - S_real)(X_i - Xbar_k), computed in ``dtype``."""
    x = syn.to(dtype)
    diff = oracle_cov(syn, lab_s, k, dtype) - oracle_cov(real, lab_r, k, dtype)
    out = torch.zeros_like(x)
    for c in range(k):
        idx = (lab_s == c).nonzero()[:, 0]
        xc = x[idx] - x[idx].mean(0)
        out[idx] = 4 * weight / len(idx) * torch.einsum("cd,idl->icl", diff[c], xc)
    return out


@pytest.mark.parametrize("shape", [(4, 3, 5, 2, 6), (12, 16, 9, 3, 9), (1, 1, 1, 1, 3), (20, 7, 16, 5, 15)], ids=str)
@pytest.mark.parametrize("group_form", ["int", "labels"])
def test_covariance_matching_loss(backend, device, shape, group_form):
    n_s, c, l, k, n_r = shape
    g = torch.Generator().manual_seed(n_s + c)
    syn, real = rand(n_s, c, l, gen=g), rand(n_r, c, l, gen=g)
    lab_s = labels_for(n_s, k, g, contiguous=group_form == "int")
    lab_r = labels_for(n_r, k, g, contiguous=group_form == "int")
    if group_form == "int":
        sg, rg = k, k
    else:
        sg, rg = lab_s.to(device), lab_r.to(device)
    s = syn.to(device, copy=True).requires_grad_()
    r = real.to(device, copy=True).requires_grad_()
    loss = edfkern.covariance_matching_loss(s, r, syn_groups=sg, real_groups=rg, weight=0.03)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_formula(loss.cpu(), lambda dt: oracle_cm(syn, real, lab_s, lab_r, k, 0.03, dt), "loss")
    assert_formula(s.grad.cpu(), lambda dt: oracle_cm_grad(syn, real, lab_s, lab_r, k, 0.03, dt), "grad syn")
    assert_formula(r.grad.cpu(), lambda dt: oracle_cm_grad(real, syn, lab_r, lab_s, k, 0.03, dt), "grad real")
    # baseline (loop + autograd) on the same inputs
    sb, rb = syn.clone().requires_grad_(), real.clone().requires_grad_()
    bl = baselines.covariance_matching_loss(sb, rb, syn_groups=k if group_form == "int" else lab_s,
                                            real_groups=k if group_form == "int" else lab_r, weight=0.03)
    bl.backward()
    assert_fp_rule(loss.cpu(), oracle_cm(syn, real, lab_s, lab_r, k, 0.03), bl.detach(), "loss vs the baseline's error")
    assert_fp_rule(s.grad.cpu(), oracle_cm_grad(syn, real, lab_s, lab_r, k, 0.03), sb.grad,
                   "grad vs the baseline autograd's error")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_covariance_matching_dtypes(backend, device, dtype):
    g = torch.Generator().manual_seed(4)
    syn, real = rand(8, 6, 4, dtype=dtype, gen=g), rand(10, 6, 4, dtype=dtype, gen=g)
    s = syn.to(device, copy=True).requires_grad_()
    loss = edfkern.covariance_matching_loss(s, real.to(device), syn_groups=2, real_groups=2)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype
    lab_s, lab_r = torch.arange(8) // 4, torch.arange(10) // 5
    assert_formula(loss.cpu(), lambda dt: oracle_cm(syn, real, lab_s, lab_r, 2, 0.01, dt), "loss")
    assert_formula(s.grad.cpu(), lambda dt: oracle_cm_grad(syn, real, lab_s, lab_r, 2, 0.01, dt), "grad")


def test_covariance_matching_gradcheck(backend, device):
    g = torch.Generator().manual_seed(5)
    syn = rand(6, 3, 4, dtype=torch.float64, gen=g).to(device).requires_grad_()
    real = rand(9, 3, 4, dtype=torch.float64, gen=g).to(device).requires_grad_()
    ls = torch.tensor([0, 1, 1, 0, 2, 2], device=device)
    assert torch.autograd.gradcheck(
        lambda a, b: edfkern.covariance_matching_loss(a, b, syn_groups=ls, real_groups=3, weight=0.5), (syn, real))


def test_covariance_matching_noncontiguous(backend, device):
    g = torch.Generator().manual_seed(6)
    syn, real = rand(6, 5, 4, gen=g).to(device), rand(6, 5, 4, gen=g).to(device)
    a = edfkern.covariance_matching_loss(noncontig(syn), noncontig(real), syn_groups=3, real_groups=3)
    b = edfkern.covariance_matching_loss(syn, real, syn_groups=3, real_groups=3)
    assert torch.equal(a, b), "non-contiguous inputs must give the contiguous result exactly"


def test_covariance_matching_only_requested_grads():
    syn, real = torch.randn(4, 3, 2, requires_grad=True), torch.randn(4, 3, 2)
    edfkern.covariance_matching_loss(syn, real, syn_groups=2, real_groups=2).backward()
    assert syn.grad is not None and real.grad is None


def test_covariance_bad_inputs():
    x = torch.randn(6, 3, 4)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        edfkern.local_covariance(x, groups=4)
    with pytest.raises(ValueError, match="labels must lie in"):
        edfkern.local_covariance(x, groups=torch.tensor([0, 1, 2, 3, 0, 1]), num_groups=3)
    with pytest.raises(TypeError, match="integer dtype"):
        edfkern.local_covariance(x, groups=torch.zeros(6))
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        edfkern.local_covariance(x, groups=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have shape"):
        edfkern.local_covariance(x[0, 0], groups=1)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        edfkern.local_covariance(x.long(), groups=2)
    with pytest.raises(TypeError, match="groups"):
        edfkern.local_covariance(x, groups=2.0)
    with pytest.raises(ValueError, match="num_groups"):
        edfkern.local_covariance(x, groups=torch.zeros(6, dtype=torch.long), num_groups=0)
    with pytest.raises(ValueError, match="real must have the same"):
        edfkern.covariance_matching_loss(x, torch.randn(6, 3, 5), syn_groups=2, real_groups=2)
    with pytest.raises(ValueError, match="syn_groups has 2 groups but real_groups has 3"):
        edfkern.covariance_matching_loss(x, x, syn_groups=2, real_groups=3)
    with pytest.raises(ValueError, match="group 1 is empty on the real side"):
        edfkern.covariance_matching_loss(x, x, syn_groups=2, real_groups=torch.zeros(6, dtype=torch.long),
                                         num_groups=2)
    with pytest.raises(TypeError, match="real must have the same dtype"):
        edfkern.covariance_matching_loss(x, x.double(), syn_groups=2, real_groups=2)
    with pytest.raises(ValueError, match="device"):
        edfkern.covariance_matching_loss(x, x.to("meta"), syn_groups=2, real_groups=2)
    with pytest.raises(ValueError, match="syn_groups must be on the same device"):
        edfkern.covariance_matching_loss(x, x, syn_groups=torch.zeros(6, dtype=torch.long, device="meta"),
                                         real_groups=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="profiles CPU allocations; on CUDA the bench measures workspace")
def test_no_per_sample_products(backend):
    """No backend forms the (n, C, C) per-sample products: every allocation stays below N*C*C floats."""
    from tests.test_dae import _largest_allocation

    n, c, l, k = 240, 48, 4, 3
    syn = rand(n, c, l).requires_grad_()
    real = rand(n, c, l)

    def step():
        syn.grad = None
        edfkern.covariance_matching_loss(syn, real, syn_groups=k, real_groups=k).backward()

    big = max(_largest_allocation(step), _largest_allocation(lambda: edfkern.local_covariance(real, groups=k)))
    assert big < n * c * c * 4 // 4, f"{backend}: an allocation of {big} bytes; (N, C, C) would be {n * c * c * 4}"
