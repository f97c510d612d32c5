"""CPD (docs/ops.md): keep-sets identical to a stable sort, loss and gradient against oracles."""
from __future__ import annotations

import math

import pytest
import torch

import edfkern
from edfkern import baselines
from tests._utils import DTYPES, assert_close, assert_formula, assert_fp_rule, noncontig, rand


def stable_sort_keep(l: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """Independent oracle: numpy's stable argsort on the flat values."""
    flat = l.reshape(-1).double().cpu().numpy()
    k = int(math.floor(drop_ratio * flat.size))
    order = flat.argsort(kind="stable")
    keep = torch.ones(flat.size, dtype=torch.bool)
    keep[torch.from_numpy(order[:k])] = False
    return keep.view(l.shape)


def oracle_loss(s, t, s0, drop_ratio, dtype=torch.float64):
    """(loss, grad, keep) with the sums computed in ``dtype`` (float64: the oracle)."""
    # the keep-set comes from l as the op computes it (in the acc dtype), so ties match exactly
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    keep = stable_sort_keep((s.to(acc) - t.to(acc)) ** 2, drop_ratio)
    s, t, s0 = s.to(dtype), t.to(dtype), s0.to(dtype)
    l, d = (s - t) ** 2, (s0 - t) ** 2
    loss = l[keep].sum() / d[keep].sum()
    grad = torch.where(keep, 2 * (s - t), torch.zeros_like(s)) / d[keep].sum()
    return loss, grad, keep


@pytest.mark.parametrize("p", [1, 2, 7, 1000, 4099])
@pytest.mark.parametrize("drop_ratio", [0.0, 0.25, 0.375, 0.5, 0.999])
def test_cpd_loss_and_grad(backend, device, p, drop_ratio):
    g = torch.Generator().manual_seed(p)
    s, t, s0 = (rand(p, gen=g) for _ in range(3))
    sd = s.to(device, copy=True).requires_grad_()
    loss = edfkern.cpd_trajectory_loss(sd, t.to(device), s0.to(device), drop_ratio=drop_ratio)
    loss.backward()
    exp_loss, exp_grad, _ = oracle_loss(s, t, s0, drop_ratio)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_formula(loss.cpu(), lambda dt: oracle_loss(s, t, s0, drop_ratio, dt)[0], "loss")
    assert_formula(sd.grad.cpu(), lambda dt: oracle_loss(s, t, s0, drop_ratio, dt)[1], "grad")
    base = baselines.cpd_trajectory_loss(s, t, s0, drop_ratio=drop_ratio)
    assert_fp_rule(loss.cpu(), exp_loss, base, "loss vs the baseline's error")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpd_dtypes(backend, device, dtype):
    g = torch.Generator().manual_seed(3)
    s, t, s0 = (rand(3001, dtype=dtype, gen=g) for _ in range(3))
    sd = s.to(device, copy=True).requires_grad_()
    loss = edfkern.cpd_trajectory_loss(sd, t.to(device), s0.to(device), drop_ratio=0.375)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert sd.grad.dtype == dtype
    assert_formula(loss.cpu(), lambda dt: oracle_loss(s, t, s0, 0.375, dt)[0], "loss")
    assert_formula(sd.grad.cpu(), lambda dt: oracle_loss(s, t, s0, 0.375, dt)[1], "grad")


@pytest.mark.parametrize("case", ["all_equal", "few_values", "tie_at_threshold", "zeros_and_ones"])
@pytest.mark.parametrize("drop_ratio", [0.25, 0.5, 0.9])
def test_cpd_ties_follow_stable_sort(backend, device, case, drop_ratio):
    g = torch.Generator().manual_seed(7)
    p = 513
    if case == "all_equal":
        l = torch.full((p,), 0.5)
    elif case == "few_values":
        l = torch.randint(0, 4, (p,), generator=g).float() / 4
    elif case == "tie_at_threshold":
        l = torch.rand(p, generator=g)
        k = int(math.floor(drop_ratio * p))
        v = torch.sort(l).values[k - 1].item()
        l[torch.randperm(p, generator=g)[:40]] = v  # 40 more copies of the k-th value, scattered
    else:
        l = (torch.rand(p, generator=g) > 0.5).float()
    got = edfkern.cpd_keep_mask(l.to(device), drop_ratio)
    exp = stable_sort_keep(l, drop_ratio)
    assert torch.equal(got.cpu(), exp), f"{int((got.cpu() != exp).sum())} indices differ from a stable sort"
    assert torch.equal(baselines.cpd_keep_mask(l, drop_ratio), exp)
    assert int((~got).sum()) == int(math.floor(drop_ratio * p))


def test_cpd_loss_ties_use_the_same_keep_set(backend, device):
    # student - target takes few distinct values: many exactly equal l, tie at the threshold
    g = torch.Generator().manual_seed(9)
    p = 1001
    t = rand(p, gen=g)
    s = t + (torch.randint(-2, 3, (p,), generator=g).float() * 0.5)
    s0 = rand(p, gen=g)
    sd = s.to(device, copy=True).requires_grad_()
    loss = edfkern.cpd_trajectory_loss(sd, t.to(device), s0.to(device), drop_ratio=0.4)
    loss.backward()
    exp_loss, exp_grad, keep = oracle_loss(s, t, s0, 0.4)
    assert_formula(loss.cpu(), lambda dt: oracle_loss(s, t, s0, 0.4, dt)[0], "loss")
    assert torch.equal(sd.grad.cpu() != 0, keep & (s != t)), "gradient support must be the kept set"


def test_cpd_keep_mask_shapes_and_dtypes(backend, device):
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        l = rand(6, 7, 5, dtype=dtype, gen=g).abs()
        got = edfkern.cpd_keep_mask(l.to(device), 0.3)
        assert got.shape == l.shape and got.dtype == torch.bool
        assert torch.equal(got.cpu(), stable_sort_keep(l, 0.3))
    l = rand(9, 8, gen=g).abs()
    assert torch.equal(edfkern.cpd_keep_mask(noncontig(l.to(device)), 0.5).cpu(), stable_sort_keep(l, 0.5))


def test_cpd_noncontiguous_and_shaped(backend, device):
    g = torch.Generator().manual_seed(11)
    s, t, s0 = (rand(40, 30, gen=g) for _ in range(3))
    a = edfkern.cpd_trajectory_loss(noncontig(s.to(device)), noncontig(t.to(device)), noncontig(s0.to(device)),
                                    drop_ratio=0.3)
    b = edfkern.cpd_trajectory_loss(s.to(device), t.to(device), s0.to(device), drop_ratio=0.3)
    assert_close(a, b, 0, 0, "non-contiguous")
    sd = s.to(device, copy=True).requires_grad_()
    edfkern.cpd_trajectory_loss(sd, t.to(device), s0.to(device), drop_ratio=0.3).backward()
    assert sd.grad.shape == s.shape


def test_cpd_gradcheck_fp64(backend, device):
    g = torch.Generator().manual_seed(13)
    s, t, s0 = (rand(200, dtype=torch.float64, gen=g).to(device) for _ in range(3))
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: edfkern.cpd_trajectory_loss(x, t, s0, drop_ratio=0.375), (s,))


def test_cpd_gradient_flows_to_student_only():
    s, t, s0 = (torch.randn(50, dtype=torch.float64, requires_grad=True) for _ in range(3))
    edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=0.2).backward()
    assert s.grad is not None and t.grad is None and s0.grad is None


def test_cpd_double_backward_is_refused():
    s = torch.randn(20, requires_grad=True)
    t, s0 = torch.randn(20), torch.randn(20)
    loss = edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=0.25)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_cpd_bad_inputs():
    s, t, s0 = torch.randn(10), torch.randn(10), torch.randn(10)
    for r in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="drop_ratio"):
            edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=r)
        with pytest.raises(ValueError, match="drop_ratio"):
            edfkern.cpd_keep_mask(s, r)
    with pytest.raises(ValueError, match="target"):
        edfkern.cpd_trajectory_loss(s, torch.randn(11), s0, drop_ratio=0.1)
    with pytest.raises(ValueError, match="start"):
        edfkern.cpd_trajectory_loss(s, t, torch.randn(5), drop_ratio=0.1)
    with pytest.raises(TypeError, match="student"):
        edfkern.cpd_trajectory_loss(s.long(), t, s0, drop_ratio=0.1)
    with pytest.raises(TypeError, match="target"):
        edfkern.cpd_trajectory_loss(s, t.double(), s0, drop_ratio=0.1)
    with pytest.raises(ValueError, match="device"):
        edfkern.cpd_trajectory_loss(s, t, s0.to("meta"), drop_ratio=0.1)
    with pytest.raises(ValueError, match="P >= 1"):
        edfkern.cpd_trajectory_loss(s[:0], t[:0], s0[:0], drop_ratio=0.1)
    with pytest.raises(TypeError, match="drop_ratio"):
        edfkern.cpd_keep_mask(s, "0.5")
    with pytest.raises(TypeError, match="l"):
        edfkern.cpd_keep_mask(s.int(), 0.5)
