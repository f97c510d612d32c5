"""Kernel-level tests of the ``triton`` backend: every contract function against ``edfkern.reference``.

The op-level suites (tests/test_*.py) already run the registered ops under every
backend; this file calls ``edfkern.triton.<fn>`` directly, on fresh random data at small
odd shapes (the CPU interpreter is slow), in every dtype, with label groups that need a
permutation and contain an empty group, CPD ties at the threshold and k == 0.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py -q

Tests marked ``gpu`` use large shapes (int64 offsets, SPEC section 7 sizes) and run only on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest does this too; must precede the triton import

pytest.importorskip("triton")

import edfkern  # noqa: E402
import edfkern.reference as R  # noqa: E402
from edfkern.reference._common import upsample  # noqa: E402
from tests._utils import DTYPES, assert_close, assert_within_torch_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not edfkern.backends()["triton"]["available"] or DEVICE not in edfkern.backends()["triton"]["devices"]:
    pytest.skip(f"triton backend unavailable: {edfkern.backends()['triton']['reason']}", allow_module_level=True)

import edfkern.triton as T  # noqa: E402

# one rounding of the stored dtype (results written back in the input dtype)
STORE = {torch.float32: (2e-6, 1e-6), torch.float64: (1e-12, 1e-13),
         torch.float16: (1e-3, 1e-4), torch.bfloat16: (8e-3, 1e-3)}  # two half-ulps of fp16 / bf16
# accumulated in fp32 (fp64 for fp64)
ACC = {torch.float32: (2e-5, 1e-6), torch.float64: (1e-11, 1e-13),
       torch.float16: (2e-5, 1e-6), torch.bfloat16: (2e-5, 1e-6)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def _rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def _csr(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(labels, minlength=k)
    offsets = torch.zeros(k + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return torch.sort(labels, stable=True).indices.to(DEVICE), offsets.to(DEVICE)


def _groups(kind: str, n: int, k: int, seed: int):
    """(n_rows, perm, offsets).

    'equal': K contiguous blocks, perm None; 'labels': shuffled labels, group 1 empty (K >= 3).
    """
    if kind == "equal":
        ipc = max(1, n // k)
        return ipc * k, None, (torch.arange(k + 1, dtype=torch.int64) * ipc).to(DEVICE)
    labels = torch.randint(0, k, (n,), generator=_gen(seed))
    labels[labels == 1] = 0  # an empty group
    labels[0], labels[-1] = k - 1, 0  # never sorted already
    return n, *_csr(labels, k)


# ----------------------------------------------------------------------------- DAE


def _near_threshold(cam: torch.Tensor, threshold, H: int, W: int) -> torch.Tensor:
    """(N, H, W) bool: pixels whose U(cam) lies within rounding of tau (the SPEC lets them flip)."""
    acc = torch.float64 if cam.dtype == torch.float64 else torch.float32
    u = upsample(cam.to(acc), (H, W))
    tau = u.mean(dim=(1, 2), keepdim=True) if threshold is None else torch.tensor(threshold, dtype=acc)
    tol = 1e-12 if acc == torch.float64 else 1e-5
    return (u - tau).abs() <= tol * (1 + tau.abs())


DAE_SHAPES = [(3, 2, 4, 4, 33, 17), (2, 3, 5, 3, 5, 3), (1, 1, 3, 7, 16, 16), (2, 4, 1, 1, 7, 9),
              (2, 3, 4, 4, 40, 37)]  # N, C, h, w, H, W; the last has H*W > one 1024-pixel block


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DAE_SHAPES, ids=str)
@pytest.mark.parametrize("threshold", [None, 0.4], ids=str)
def test_dae_mask_and_scale(dtype, shape, threshold):
    n, c, h, w, H, W = shape
    cam = _rand(n, h, w, dtype=dtype, seed=sum(shape))
    if (h, w) == (1, 1) and threshold is None:
        cam = _rand(n, 2, 2, dtype=dtype, seed=1)  # a constant map sits exactly on its mean: all pixels tie
        h = w = 2
    keep = ~_near_threshold(cam, threshold, H, W)
    got, exp = T.dae_mask(cam, 1.5, threshold, H, W), R.dae_mask(cam, 1.5, threshold, H, W)
    assert got.shape == (n, 1, H, W) and got.dtype == cam.dtype
    assert_close(got[:, 0][keep], exp[:, 0][keep], *STORE[dtype], name="dae_mask")
    assert (~keep).float().mean() < 0.05

    grad = _randn(n, c, H, W, dtype=dtype, seed=3)
    g1, g2 = grad.clone(), grad.clone()
    T.dae_(g1, cam, 1.5, threshold)
    R.dae_(g2, cam, 1.5, threshold)
    sel = keep[:, None].expand_as(g1)
    assert_close(g1[sel], g2[sel], *STORE[dtype], name="dae_")


SGD_CONFIGS = [  # momentum, dampening, weight_decay, nesterov, maximize, first_step
    (0.5, 0.0, 0.0, False, False, False),
    (0.5, 0.0, 0.0, False, False, True),
    (0.9, 0.1, 0.01, False, True, False),
    (0.9, 0.0, 0.05, True, False, False),
    (0.0, 0.0, 0.1, False, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=str)
@pytest.mark.parametrize("identity", [False, True], ids=["upsampled", "identity"])
def test_dae_sgd_step(dtype, cfg, identity):
    momentum, dampening, wd, nesterov, maximize, first = cfg
    n, c, H, W = 3, 2, 11, 13
    h, w = (H, W) if identity else (4, 3)
    threshold = 0.45 if identity else None
    cam = _rand(n, h, w, dtype=dtype, seed=5)
    grad = _randn(n, c, H, W, dtype=dtype, seed=6)
    param = _randn(n, c, H, W, dtype=dtype, seed=7)
    buf = _randn(n, c, H, W, dtype=dtype, seed=8) if momentum else None
    p1, p2 = param.clone(), param.clone()
    b1, b2 = (buf.clone(), buf.clone()) if buf is not None else (None, None)
    g0 = grad.clone()
    args = (100.0, 1.5, threshold, momentum, dampening, wd, nesterov, maximize, first)
    T.dae_sgd_step_(p1, grad, b1, cam, *args)
    R.dae_sgd_step_(p2, grad, b2, cam, *args)
    assert torch.equal(grad, g0), "grad must be left untouched"
    if identity:  # U is the identity and the threshold is fixed: the same fp ops as the reference, bit for bit
        assert torch.equal(p1, p2), f"param: {(p1 != p2).sum()} elements differ"
        if buf is not None:
            assert torch.equal(b1, b2), f"buf: {(b1 != b2).sum()} elements differ"
        return
    sel = (~_near_threshold(cam, threshold, H, W))[:, None].expand_as(p1)
    rtol, atol = STORE[dtype]
    assert_close(p1[sel], p2[sel], rtol, atol * 100, name="param")  # |param| ~ lr
    if buf is not None:
        assert_close(b1[sel], b2[sel], rtol, atol, name="buf")


# ----------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "smoothgradcam++"])
@pytest.mark.parametrize("size", [None, (9, 13)], ids=str)
def test_grad_cam(dtype, method, size):
    s, n, c, h, w = 3, 2, 37, 5, 3
    A = _rand(s, n, c, h, w, dtype=dtype, seed=1)  # activations after a ReLU
    G = _randn(s, n, c, h, w, dtype=dtype, seed=2)
    Ac = _rand(n, c, h, w, dtype=dtype, seed=3) if method == "smoothgradcam++" else None
    if method != "smoothgradcam++":
        A, G = A[0], G[0]
    for normalize in (True, False):
        got = T.grad_cam(A, G, Ac, method, normalize, size)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # oracle: the reference in fp64 on the same (rounded) inputs
        exp = R.grad_cam(A.double(), G.double(), None if Ac is None else Ac.double(), method, normalize, size)
        scale = exp.abs().max().item()
        if dtype == torch.float64:
            assert_close(got, exp, 1e-10, 1e-12 * scale, name=f"{method} normalize={normalize}")
        else:  # fp32 accumulation of an ill-conditioned alpha: at most 2x torch's own fp32 error
            torch32 = R.grad_cam(A.float(), G.float(), None if Ac is None else Ac.float(), method, normalize, size)
            assert_within_torch_error(got, torch32, exp, 1e-5, 1e-6 * scale, name=f"{method} normalize={normalize}")


# ----------------------------------------------------------------------------- CPD


def _cpd_inputs(p: int, mode: str, dtype, seed: int):
    s0 = _randn(p, dtype=dtype, seed=seed + 2)
    if mode == "random":
        return _randn(p, dtype=dtype, seed=seed), _randn(p, dtype=dtype, seed=seed + 1), s0
    # integer differences: l takes ~4 values, so the threshold value is tied many times over
    diff = torch.randint(-3, 4, (p,), generator=_gen(seed)).to(dtype).to(DEVICE)
    target = _randn(p, dtype=dtype, seed=seed + 1).round()
    return target + diff, target, s0


def _stable_sort_keep(l: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(l.numel(), dtype=torch.bool, device=l.device)
    keep[torch.sort(l, stable=True).indices[:k]] = False
    return keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 7, 2053, 6001])
@pytest.mark.parametrize("mode", ["random", "ties"])
def test_cpd_forward_backward(dtype, p, mode):
    student, target, start = _cpd_inputs(p, mode, dtype, seed=p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    l = (student.to(acc) - target.to(acc)) ** 2
    for ratio in (0.0, 0.25, 0.5, 0.9):
        k = int(ratio * p)
        sl, sd, thr, tie = T.cpd_forward(student, target, start, k)
        rsl, rsd, rthr, rtie = R.cpd_forward(student, target, start, k)
        assert all(v.dim() == 0 for v in (sl, sd, thr, tie)) and tie.dtype == torch.int64 and thr.dtype == acc
        assert torch.equal(thr, rthr) and torch.equal(tie, rtie), f"k={k}: thr/tie {thr, tie} != {rthr, rtie}"
        if k == 0:
            assert thr.item() == float("-inf") and tie.item() == 0
        keep = ~((l < thr) | ((l == thr) & (torch.arange(p, device=l.device) < tie)))
        assert torch.equal(keep, _stable_sort_keep(l, k)), f"k={k}: keep-set differs from a stable sort"
        rtol, atol = ACC[dtype]
        assert_close(sl, rsl, rtol, atol, name="sum_l")
        assert_close(sd, rsd, rtol, atol, name="sum_d")
        g = torch.tensor(0.75, dtype=acc, device=DEVICE)
        got = T.cpd_backward(g, student, target, start, rthr, rtie, rsd)
        assert got.dtype == dtype
        assert torch.equal(got, R.cpd_backward(g, student, target, start, rthr, rtie, rsd)), "cpd_backward"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 5, 2049, 4099])
@pytest.mark.parametrize("mode", ["random", "ties"])
def test_cpd_keep_mask(dtype, p, mode):
    if mode == "random":
        l = _randn(p, dtype=dtype, seed=p)  # negative values too: other DD methods pass any losses
    else:
        l = torch.randint(-2, 3, (p,), generator=_gen(p)).to(dtype).to(DEVICE)
        l[l == 0] = -0.0 if p % 2 else 0.0
        l[::3] = 0.0  # -0.0 and +0.0 tie
    for ratio in (0.0, 0.3, 0.5, 0.99):
        k = int(ratio * p)
        got = T.cpd_keep_mask(l, k)
        assert got.dtype == torch.bool and got.shape == l.shape
        assert torch.equal(got, R.cpd_keep_mask(l, k)), f"k={k}: {(got != R.cpd_keep_mask(l, k)).sum()} differ"
        assert int((~got).sum()) == k


# ----------------------------------------------------------------------------- covariance and flat features


COV_CASES = [  # n, C, L, K, groups
    (12, 5, 3, 3, "equal"),
    (11, 20, 16, 4, "labels"),
    (7, 33, 1, 3, "labels"),
    (20, 5, 16, 2, "equal"),  # few classes, many columns: the split-K path (SPLIT > 1)
    (11, 70, 5, 3, "labels"),  # C=70 > one 64-channel tile: the fp32 tl.dot path with 2x2 tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", COV_CASES, ids=str)
def test_covariance(dtype, case):
    n, c, L, k, kind = case
    n, perm, offsets = _groups(kind, n, k, seed=n)
    x = _randn(n, c, L, dtype=dtype, seed=c)
    sigma, mean = T.cov_forward(x, perm, offsets)
    rsigma, rmean = R.cov_forward(x, perm, offsets)
    assert sigma.dtype == rsigma.dtype and mean.dtype == rmean.dtype
    rtol, atol = ACC[dtype]
    assert_close(mean, rmean, rtol, atol, name="mean")
    assert_close(sigma, rsigma, rtol, atol * 10, name="sigma")
    if kind == "labels":
        assert sigma[1].abs().max() == 0 and mean[1].abs().max() == 0, "empty group must give zeros"
    M = _randn(k, c, c, dtype=rsigma.dtype, seed=9)
    got = T.cov_backward(x, perm, offsets, rmean, M)
    exp = R.cov_backward(x, perm, offsets, rmean, M)
    assert got.dtype == dtype
    assert_close(got, exp, STORE[dtype][0] * 4, STORE[dtype][1] * 10, name="cov_backward")


def test_covariance_allow_tf32_flag_runs():
    n, perm, offsets = _groups("labels", 9, 3, seed=1)
    x = _randn(n, 17, 4, seed=2)
    old = edfkern.config.allow_tf32
    try:
        edfkern.config.allow_tf32 = True
        assert edfkern.triton._utils.dot_precision() == "tf32"  # the flag reaches the kernels' tl.dot
        sigma, _ = T.cov_forward(x, perm, offsets)
    finally:
        edfkern.config.allow_tf32 = old
    assert edfkern.triton._utils.dot_precision() == "ieee"
    assert_close(sigma, R.cov_forward(x, perm, offsets)[0], 1e-2, 1e-3, name="tf32 sigma")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(12, 37, 3, "equal"), (13, 70, 5, "labels"), (6, 1, 3, "labels"),
                                  (13, 300, 3, "labels")], ids=str)  # D=300: more than one feature tile
def test_flat_features(dtype, case):
    n, d, k, kind = case
    n, perm, offsets = _groups(kind, n, k, seed=d)
    x = _randn(n, d, dtype=dtype, seed=n)
    rtol, atol = ACC[dtype]
    assert_close(T.seg_mean(x, perm, offsets), R.seg_mean(x, perm, offsets), rtol, atol, name="seg_mean")
    sq, mean = T.cc_forward(x, perm, offsets)
    rsq, rmean = R.cc_forward(x, perm, offsets)
    assert sq.dim() == 0 and sq.dtype == rsq.dtype
    assert_close(sq, rsq, rtol, atol, name="cc sum")
    assert_close(mean, rmean, rtol, atol, name="cc mean")
    g = torch.tensor(0.3, dtype=rsq.dtype, device=DEVICE)
    got = T.cc_backward(g, x, perm, offsets, rmean, 0.1)
    assert got.dtype == dtype
    assert_close(got, R.cc_backward(g, x, perm, offsets, rmean, 0.1), *STORE[dtype], name="cc_backward")


# ----------------------------------------------------------------------------- registration


def test_backend_registered_and_dispatches():
    info = edfkern.backends()["triton"]
    assert info["available"] and DEVICE in info["devices"]
    from edfkern._dispatch import kernel

    with edfkern.use_backend("triton"):
        for name in R.__all__:
            assert kernel(name, torch.device(DEVICE)).__wrapped__ is getattr(T, name)


def _registered_cases():
    cam = _rand(2, 4, 4, seed=1)
    off = torch.tensor([0, 3, 6], device=DEVICE)
    return [
        ("dae_mask", (cam, 1.0, None, 9, 7)),
        ("cpd_forward", (_randn(300, seed=2), _randn(300, seed=3), _randn(300, seed=4), 100)),
        ("cpd_keep_mask", (_randn(300, seed=5), 100)),
        ("cov_forward", (_randn(6, 5, 3, seed=6), None, off)),
        ("grad_cam", (_rand(2, 5, 3, 3, seed=7), _randn(2, 5, 3, 3, seed=8), None, "gradcam++", True, [7, 7])),
        ("cc_forward", (_randn(6, 5, seed=9), None, off)),
    ]


def test_registered_triton_ops_match_launchers():
    """torch.ops.edfkern_triton.* (triton_op + wrap_triton) give the same results as the contract functions."""
    ops = getattr(torch.ops, "edfkern_triton", None)
    if ops is None or not hasattr(ops, "dae_mask"):
        pytest.skip("torch without torch.library.triton_op: nothing registered")
    for name, args in _registered_cases():
        got, exp = getattr(ops, name)(*args), getattr(T, name)(*args)
        for g, e in zip(got if isinstance(got, (tuple, list)) else (got,), exp if isinstance(exp, tuple) else (exp,)):
            assert torch.equal(g, e), name
    grad = _randn(2, 3, 9, 7, seed=10)
    g1, g2 = grad.clone(), grad.clone()
    ops.dae_(g1, _rand(2, 4, 4, seed=1), 1.0, None)
    T.dae_(g2, _rand(2, 4, 4, seed=1), 1.0, None)
    assert torch.equal(g1, g2)


@pytest.mark.gpu
def test_registered_triton_ops_opcheck_gpu():
    """Fake-tensor / schema checks; under the CPU interpreter the fake pass touches data pointers, so GPU only."""
    for name, args in _registered_cases():
        torch.library.opcheck(getattr(torch.ops.edfkern_triton, name), args)


# ----------------------------------------------------------------------------- GPU only: big shapes


@pytest.mark.gpu
def test_dae_int64_offsets_gpu():
    """N*C*H*W > 2^31: offsets must be int64 (bf16 keeps it at ~4.3 GB per tensor)."""
    n, c, H, W = 2, 4, 16384, 16385
    assert n * c * H * W > 2 ** 31
    cam = torch.rand(n, 4, 4, device="cuda")
    grad = torch.ones(n, c, H, W, device="cuda", dtype=torch.bfloat16)
    T.dae_(grad, cam, 1.0, 0.5)
    mask = R.dae_mask(cam, 1.0, 0.5, H, W)  # (n, 1, H, W) in fp32
    last = (grad[-1, -1, -64:, -64:].float() - mask[-1, 0, -64:, -64:].to(torch.bfloat16).float()).abs().max()
    assert last == 0


@pytest.mark.gpu
def test_dae_sgd_step_imagenette_gpu():
    n, c, H, W = 500, 3, 128, 128
    cam = torch.rand(n, 4, 4, device="cuda")
    grad, param, buf = (torch.randn(n, c, H, W, device="cuda") for _ in range(3))
    p1, p2, b1, b2 = param.clone(), param.clone(), buf.clone(), buf.clone()
    T.dae_sgd_step_(p1, grad, b1, cam, 100.0, 1.0, None, 0.5, 0.0, 0.0, False, False, False)
    R.dae_sgd_step_(p2, grad, b2, cam, 100.0, 1.0, None, 0.5, 0.0, 0.0, False, False, False)
    assert ((p1 - p2).norm() / p2.norm()).item() < 1e-5
    assert ((b1 - b2).norm() / b2.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("p", [615_690, 11_200_000])
def test_cpd_large_gpu(p):
    student, target, start = (torch.randn(p, device="cuda") for _ in range(3))
    k = int(0.375 * p)
    got, exp = T.cpd_forward(student, target, start, k), R.cpd_forward(student, target, start, k)
    assert torch.equal(got[2], exp[2]) and torch.equal(got[3], exp[3])
    assert torch.allclose(got[0], exp[0], rtol=1e-5) and torch.allclose(got[1], exp[1], rtol=1e-5)


@pytest.mark.gpu
def test_covariance_cifar10_ipc1000_gpu():
    n, c, L, k = 10_000, 128, 16, 10
    x = torch.randn(n, c, L, device="cuda")
    offsets = torch.arange(k + 1, device="cuda") * (n // k)
    sigma, mean = T.cov_forward(x, None, offsets)
    rsigma, rmean = R.cov_forward(x, None, offsets)
    assert ((sigma - rsigma).norm() / rsigma.norm()).item() < 1e-5
    M = torch.randn(k, c, c, device="cuda")
    g, rg = T.cov_backward(x, None, offsets, mean, M), R.cov_backward(x, None, offsets, rmean, M)
    assert ((g - rg).norm() / rg.norm()).item() < 1e-5
