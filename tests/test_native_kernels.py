"""Kernel-level tests of the ``native`` backend: every contract function vs ``edfkern.reference``.

Small odd shapes, all four dtypes, label groups with a non-identity permutation and an empty
group, CPD ties and k == 0. Skipped (with the registry's reason) when the extension cannot load.
"""
from __future__ import annotations

import pytest
import torch

import edfkern
from edfkern import _checks, reference as ref
from tests.test_dae import oracle_mask

_info = edfkern.backends()["native"]
pytestmark = pytest.mark.skipif(not _info["available"], reason=f"native backend unavailable: {_info['reason']}")

if _info["available"]:
    from edfkern import native as nat

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (atol, rtol) for outputs compared in the input dtype or its acc dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
ACC_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (1e-5, 1e-5),
           torch.bfloat16: (1e-5, 1e-5)}


def assert_close(actual, expected, atol, rtol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double(), expected.double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad &= ~(a.isnan() & e.isnan())
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        pytest.fail(f"{what}: {int(bad.sum())}/{bad.numel()} mismatches; first at {idx}: "
                    f"{a[tuple(idx)].item()} vs {e[tuple(idx)].item()}")


def flip_fraction(actual, expected, atol, rtol):
    a, e = actual.double(), expected.double()
    return float((~((a - e).abs() <= atol + rtol * e.abs())).double().mean())


def groups_labels(n, k, seed=0, empty=None):
    """(perm, offsets) for shuffled labels in [0, k), with group ``empty`` left empty."""
    g = torch.Generator().manual_seed(seed)
    choices = [c for c in range(k) if c != empty]
    labels = torch.tensor(choices)[torch.randint(len(choices), (n,), generator=g)]
    labels[: len(choices)] = torch.tensor(choices)  # every other group non-empty
    labels = labels[torch.randperm(n, generator=g)]
    gr = _checks.resolve_groups(labels, n, torch.device("cpu"), k)
    assert gr.perm is not None
    return gr.perm, gr.offsets


def groups_int(n, k):
    gr = _checks.resolve_groups(k, n, torch.device("cpu"))
    return gr.perm, gr.offsets


GROUPS = {
    "int": lambda n: groups_int(n, 3),
    "labels": lambda n: groups_labels(n, 5, seed=1),
    "labels_empty": lambda n: groups_labels(n, 5, seed=2, empty=3),
}


# ----------------------------------------------------------------------------- DAE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [None, 0.4])
@pytest.mark.parametrize("shape", [(3, 4, 5, 13, 11), (1, 7, 7, 7, 7), (2, 3, 2, 9, 17)])
def test_dae_mask(dtype, threshold, shape):
    n, h, w, H, W = shape
    cam = torch.rand(n, h, w, dtype=torch.float64).to(dtype)
    out = nat.dae_mask(cam, 1.5, threshold, H, W)
    exp = ref.dae_mask(cam, 1.5, threshold, H, W)
    assert out.shape == (n, 1, H, W) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    assert flip_fraction(out, exp, atol, rtol) <= 1e-2  # a pixel on the threshold may flip (SPEC 2)
    assert (out.double() - exp.double()).norm() <= 0.05 * exp.double().norm()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_dae_(dtype, threshold):
    torch.manual_seed(0)
    grad = torch.randn(3, 5, 9, 13, dtype=torch.float64).to(dtype)
    cam = torch.rand(3, 4, 3, dtype=torch.float64).to(dtype)
    g1, g2 = grad.clone(), grad.clone()
    nat.dae_(g1, cam, 2.0, threshold)
    ref.dae_(g2, cam, 2.0, threshold)
    atol, rtol = TOL[dtype]
    assert flip_fraction(g1, g2, atol, rtol) <= 1e-2
    assert (g1.double() - g2.double()).norm() <= 1e-2 * g2.double().norm()


def test_dae_mixed_dtypes():
    grad = torch.randn(2, 3, 8, 8, dtype=torch.float16)
    cam = torch.rand(2, 3, 3, dtype=torch.float64)
    g1, g2 = grad.clone(), grad.clone()
    nat.dae_(g1, cam, 1.0, None)
    ref.dae_(g2, cam, 1.0, None)
    assert_close(g1, g2, 2e-3, 2e-3, "dae_ fp16 grad / fp64 cam")


SGD_CASES = [
    dict(momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=True),
    dict(momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False, first_step=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True, first_step=False),
    dict(momentum=0.0, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False, first_step=False),
    # torch applies no dampening on the first step: the buffer is the gradient itself
    dict(momentum=0.9, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=False, first_step=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SGD_CASES)))
def test_dae_sgd_step_(dtype, case):
    kw = SGD_CASES[case]
    torch.manual_seed(case)
    shape = (3, 2, 11, 7)
    param = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    buf = torch.randn(shape, dtype=torch.float64).to(dtype) if kw["momentum"] != 0 else None
    cam = torch.rand(3, 4, 4, dtype=torch.float64).to(dtype)
    p1, p2 = param.clone(), param.clone()
    b1, b2 = (None, None) if buf is None else (buf.clone(), buf.clone())
    g0 = grad.clone()
    nat.dae_sgd_step_(p1, grad, b1, cam, 10.0, 1.0, None, **kw)
    ref.dae_sgd_step_(p2, grad, b2, cam, 10.0, 1.0, None, **kw)
    assert torch.equal(grad, g0), "grad must be left untouched"
    atol, rtol = TOL[dtype]
    # pixels within rounding of their image's threshold may legitimately flip (SPEC section 2);
    # every other element must agree
    _, amb = oracle_mask(cam, shape[2:], 1.0, None)
    keep = ~amb.expand(shape)
    assert int(amb.sum()) <= 1
    assert_close(p1[keep], p2[keep], atol * 10, rtol, "param")  # lr = 10 scales the update
    if b1 is not None:
        assert_close(b1[keep], b2[keep], atol, rtol, "momentum buffer")


# ----------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "smoothgradcam++"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("size", [None, (13, 9)])
def test_grad_cam(dtype, method, normalize, size):
    torch.manual_seed(3)
    n, c, h, w = 3, 5, 4, 3
    lead = (2,) if method == "smoothgradcam++" else ()
    A = torch.rand(lead + (n, c, h, w), dtype=torch.float64).to(dtype)
    G = torch.randn(lead + (n, c, h, w), dtype=torch.float64).to(dtype)
    clean = torch.rand(n, c, h, w, dtype=torch.float64).to(dtype) if lead else None
    out = nat.grad_cam(A, G, clean, method, normalize, size)
    exp = ref.grad_cam(A, G, clean, method, normalize, size)
    atol, rtol = (1e-4, 1e-4) if dtype != torch.float64 else (1e-10, 1e-10)
    assert_close(out, exp, atol, rtol, f"grad_cam {method}")


# ----------------------------------------------------------------------------- CPD


def _cpd_inputs(p, dtype, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values of l: many exact ties at the threshold
        t = torch.zeros(p, dtype=torch.float64)
        s = torch.randint(0, 4, (p,), generator=g).double() * 0.5
    else:
        t = torch.randn(p, generator=g, dtype=torch.float64)
        s = t + torch.randn(p, generator=g, dtype=torch.float64)
    s0 = t + torch.randn(p, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype), s0.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p,ratio", [(1, 0.0), (7, 0.5), (1001, 0.375), (70001, 0.25), (70001, 0.0)])
def test_cpd_forward_backward(dtype, ties, p, ratio):
    s, t, s0 = _cpd_inputs(p, dtype, ties, seed=p)
    k = int(ratio * p)
    out = nat.cpd_forward(s, t, s0, k)
    exp = ref.cpd_forward(s, t, s0, k)
    acc = _checks.acc_dtype(dtype)
    for name, a, e in zip(("sum_l", "sum_d"), out[:2], exp[:2]):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close(a, e, tol, tol, f"cpd {name}")
    assert out[2].dtype == acc and out[3].dtype == torch.int64
    assert out[2].item() == exp[2].item(), "threshold differs"
    assert out[3].item() == exp[3].item(), "tie index differs"
    go = torch.tensor(0.7, dtype=acc)
    g = nat.cpd_backward(go, s, t, s0, out[2], out[3], out[1])
    ge = ref.cpd_backward(go, s, t, s0, exp[2], exp[3], exp[1])
    assert_close(g, ge, *TOL[dtype], "cpd grad")
    assert torch.equal(g == 0, ge == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,k", [(1, 0), (9, 4), (9, 8), (2000, 0), (2000, 777), (70001, 35000)])
def test_cpd_keep_mask(dtype, p, k):
    g = torch.Generator().manual_seed(p + k)
    l = torch.randint(-3, 4, (p,), generator=g).to(dtype) * 0.25  # negatives, zeros (+0 and -0), ties
    l[::5] = -l[::5]
    out = nat.cpd_keep_mask(l, k)
    exp = ref.cpd_keep_mask(l, k)
    assert out.dtype == torch.bool and int((~out).sum()) == k
    assert torch.equal(out, exp)
    l2 = torch.randn(p, generator=g).to(dtype)
    assert torch.equal(nat.cpd_keep_mask(l2, k), ref.cpd_keep_mask(l2, k))


# ----------------------------------------------------------------------------- covariance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("c,l", [(5, 3), (1, 1), (7, 1)])
def test_cov_forward_backward(dtype, groups, c, l):
    n = 21
    torch.manual_seed(5)
    x = torch.randn(n, c, l, dtype=torch.float64).to(dtype) + 0.5
    perm, offsets = GROUPS[groups](n)
    sig, mean = nat.cov_forward(x, perm, offsets)
    sig_e, mean_e = ref.cov_forward(x, perm, offsets)
    atol, rtol = ACC_TOL[dtype]
    assert_close(mean, mean_e, atol, rtol, "cov mean")
    assert_close(sig, sig_e, atol * 10, rtol * 10, "cov sigma")
    M = torch.randn(offsets.numel() - 1, c, c, dtype=sig.dtype)
    g = nat.cov_backward(x, perm, offsets, mean, M)
    ge = ref.cov_backward(x, perm, offsets, mean_e, M)
    assert_close(g, ge, *[10 * v for v in TOL[dtype]], "cov grad")


def test_cov_many_blocks():
    """More rows per class than one GEMM block holds (4096 // L = 240 rows), and a large L."""
    torch.manual_seed(6)
    x = torch.randn(2000, 9, 17)  # ~667 rows per class: the block loop runs 3 times
    perm, offsets = groups_labels(2000, 3, seed=4)
    sig, mean = nat.cov_forward(x, perm, offsets)
    sig_e, mean_e = ref.cov_forward(x, perm, offsets)
    assert_close(sig, sig_e, 1e-4, 1e-4, "sigma")
    M = torch.randn(3, 9, 9)
    assert_close(nat.cov_backward(x, perm, offsets, mean, M), ref.cov_backward(x, perm, offsets, mean_e, M),
                 1e-4, 1e-4, "grad")


# ----------------------------------------------------------------------------- flat features


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("d", [1, 13, 300])
def test_features(dtype, groups, d):
    n = 27
    torch.manual_seed(7)
    x = torch.randn(n, d, dtype=torch.float64).to(dtype) + 1.0
    perm, offsets = GROUPS[groups](n)
    atol, rtol = ACC_TOL[dtype]
    assert_close(nat.seg_mean(x, perm, offsets), ref.seg_mean(x, perm, offsets), atol, rtol, "seg_mean")
    sq, mean = nat.cc_forward(x, perm, offsets)
    sq_e, mean_e = ref.cc_forward(x, perm, offsets)
    assert_close(mean, mean_e, atol, rtol, "cc mean")
    assert_close(sq, sq_e, atol, rtol * 10, "cc sum")
    go = torch.tensor(1.3, dtype=sq.dtype)
    assert_close(nat.cc_backward(go, x, perm, offsets, mean, 0.1),
                 ref.cc_backward(go, x, perm, offsets, mean_e, 0.1), *TOL[dtype], "cc grad")


# ----------------------------------------------------------------------------- registration


def test_fake_registrations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 4, 3)
        offsets = torch.tensor([0, 3, 6])
        sig, mean = torch.ops.edfkern_native.cov_forward(x, None, offsets)
        assert sig.shape == (2, 4, 4) and mean.shape == (2, 4, 3)
        m = torch.ops.edfkern_native.dae_mask(torch.empty(2, 3, 3), 1.0, None, 8, 8)
        assert m.shape == (2, 1, 8, 8)
        keep = torch.ops.edfkern_native.cpd_keep_mask(torch.empty(10), 3)
        assert keep.dtype == torch.bool


def test_public_ops_use_native():
    x = torch.randn(12, 6)
    with edfkern.use_backend("native"):
        a = edfkern.class_centralization_loss(x, groups=3)
    with edfkern.use_backend("reference"):
        b = edfkern.class_centralization_loss(x, groups=3)
    assert torch.allclose(a, b, rtol=1e-5)


def test_opcheck():
    """Schemas (incl. mutation annotations), fake kernels and AOT tracing of every native op."""
    ops = torch.ops.edfkern_native
    perm, offsets = groups_labels(7, 4, seed=3, empty=2)
    x = torch.randn(7, 5, 3)
    s, t, s0 = torch.randn(100), torch.randn(100), torch.randn(100)
    fwd = ops.cpd_forward(s, t, s0, 30)
    cases = [
        (ops.cov_forward, (x, perm, offsets)),
        (ops.cov_backward, (x, perm, offsets, torch.randn(4, 5, 3), torch.randn(4, 5, 5))),
        (ops.seg_mean, (x.flatten(1), perm, offsets)),
        (ops.cc_forward, (x.flatten(1), None, torch.tensor([0, 3, 7]))),
        (ops.cc_backward, (torch.tensor(1.0), x.flatten(1), perm, offsets, torch.randn(4, 15), 0.1)),
        (ops.cpd_forward, (s, t, s0, 30)),
        (ops.cpd_backward, (torch.tensor(1.0), s, t, s0, fwd[2], fwd[3], fwd[1])),
        (ops.cpd_keep_mask, (torch.randn(100), 30)),
        (ops.dae_mask, (torch.rand(2, 3, 3), 1.0, None, 8, 8)),
        (ops.dae_, (torch.randn(2, 3, 8, 8), torch.rand(2, 3, 3), 1.0, None)),
        (ops.dae_sgd_step_, (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8),
                             torch.rand(2, 3, 3), 0.1, 1.0, None, 0.5, 0.0, 0.0, False, False, False)),
        (ops.grad_cam, (torch.rand(2, 4, 3, 3), torch.randn(2, 4, 3, 3), None, "gradcam++", True, [7, 7])),
    ]
    for op, args in cases:
        res = torch.library.opcheck(op, args)
        bad = {k: v for k, v in res.items() if v != "SUCCESS"}
        assert not bad, f"{op}: {bad}"
