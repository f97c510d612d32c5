"""DAE ops (docs/ops.md) on every backend, against edfkern.baselines and an fp64 oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import edfkern
from edfkern import baselines
from tests._utils import DTYPES, STORE_TOL, assert_close, noncontig, rand

# (N, C, H, W, h, w): N=1, identity upsampling, H != W, h != w, C=1, downsampling, odd sizes
SHAPES = [
    (1, 3, 8, 8, 8, 8),
    (5, 3, 37, 37, 4, 4),
    (2, 3, 17, 29, 3, 5),
    (3, 1, 16, 16, 16, 16),
    (2, 2, 5, 7, 9, 6),
]


def oracle_mask(cam: torch.Tensor, size, beta: float, threshold):
    """fp64 mask and the pixels within rounding of the threshold (which may flip, docs/ops.md)."""
    c = cam.double()
    u = c if tuple(c.shape[-2:]) == tuple(size) else F.interpolate(c[:, None], size=size, mode="bilinear",
                                                                     align_corners=False)[:, 0]
    tau = u.mean(dim=(1, 2), keepdim=True) if not threshold else torch.full_like(u[:, :1, :1], threshold)
    mask = torch.where(u >= tau, u + beta, torch.ones_like(u))
    ambiguous = (u - tau).abs() <= 1e-5 * (tau.abs() + 1)
    return mask[:, None], ambiguous[:, None]


def _inputs(shape, dtype, seed=0):
    n, c, H, W, h, w = shape
    g = torch.Generator().manual_seed(seed)
    grad = rand(n, c, H, W, dtype=dtype, gen=g)
    cam = torch.rand(n, h, w, generator=g, dtype=torch.float64).to(dtype)
    return grad, cam


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threshold", [None, 0.0, 0.4])
def test_dae_mask_matches_oracle_and_baseline(backend, device, shape, threshold):
    _, cam = _inputs(shape, torch.float32)
    size = shape[2:4]
    got = edfkern.dae_mask(cam.to(device), beta=1.5, threshold=threshold, size=size)
    exp, amb = oracle_mask(cam, size, 1.5, threshold)
    assert got.shape == exp.shape and got.dtype == cam.dtype
    assert int(amb.sum()) <= max(1, 1e-5 * amb.numel())
    assert_close(got.cpu()[~amb], exp[~amb], 1e-5, 1e-6, "mask vs fp64")
    base = baselines.create_soft_mask(cam, size, 1.5, threshold)
    assert_close(got.cpu()[~amb], base[~amb], 1e-5, 1e-6, "mask vs baseline")


def test_dae_mask_accepts_n1hw_and_default_size(backend, device):
    _, cam = _inputs((3, 1, 6, 5, 6, 5), torch.float32)
    a = edfkern.dae_mask(cam[:, None].to(device), beta=1.0)
    b = edfkern.dae_mask(cam.to(device), beta=1.0, size=(6, 5))
    assert a.shape == (3, 1, 6, 5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dae_inplace(backend, device, shape, dtype):
    grad, cam = _inputs(shape, dtype, seed=1)
    g = grad.to(device, copy=True)
    out = edfkern.dae_(g, cam.to(device), beta=2.0)
    assert out is g and g.dtype == dtype
    mask, amb = oracle_mask(cam, shape[2:4], 2.0, None)
    exp = grad.double() * mask
    keep = ~amb.expand_as(exp)
    assert_close(g.cpu()[keep], exp[keep], *STORE_TOL[dtype], name=f"dae_ {dtype}")
    if dtype == torch.float32:
        base = baselines.dae_(grad.clone(), cam, beta=2.0)
        assert_close(g.cpu()[keep], base[keep], 1e-6, 1e-7, "dae_ vs baseline")


def test_dae_noncontiguous_grad_and_cam(backend, device):
    grad, cam = _inputs((3, 3, 12, 10, 5, 4), torch.float32, seed=2)
    g_nc = noncontig(grad.to(device))
    assert not g_nc.is_contiguous()
    edfkern.dae_(g_nc, noncontig(cam.to(device)), beta=1.0, threshold=0.3)
    g_c = grad.to(device).clone()
    edfkern.dae_(g_c, cam.to(device), beta=1.0, threshold=0.3)
    assert_close(g_nc, g_c, 0, 0, "non-contiguous vs contiguous")


SGD_CASES = [
    dict(momentum=0.5, first_step=True),
    dict(momentum=0.5),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-3),
    dict(momentum=0.5, nesterov=True, weight_decay=5e-4),
    dict(momentum=0.5, maximize=True),
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("opts", SGD_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4]], ids=str)
def test_dae_sgd_step_equals_mask_then_torch_sgd(backend, device, shape, opts):
    grad, cam = _inputs(shape, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    param, buf = rand(*grad.shape, gen=g), rand(*grad.shape, gen=g)
    p, b = param.to(device, copy=True), buf.to(device, copy=True)
    grad_d = grad.to(device, copy=True)
    grad_before = grad_d.clone()
    ret = edfkern.dae_sgd_step_(p, grad_d, b if opts["momentum"] else None, cam.to(device), lr=100.0, beta=1.0,
                                threshold=None, **opts)
    assert ret is p
    assert torch.equal(grad_d, grad_before), "grad must be left untouched"
    pe, be = param.clone(), buf.clone()
    baselines.dae_sgd_step_(pe, grad, be, cam, lr=100.0, beta=1.0, **opts)
    _, amb = oracle_mask(cam, shape[2:4], 1.0, None)
    keep = ~amb.expand_as(pe)
    # lr=100 amplifies the fp32 rounding of the update; compare relative to the update's size
    assert_close(p.cpu()[keep], pe[keep], 1e-5, 1e-3, "param")
    if opts["momentum"]:
        assert_close(b.cpu()[keep], be[keep], 1e-5, 1e-6, "momentum buffer")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dae_sgd_step_keeps_dtype(backend, device, dtype):
    shape = (2, 3, 9, 11, 3, 3)
    grad, cam = _inputs(shape, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    param, buf = rand(*grad.shape, dtype=dtype, gen=g), rand(*grad.shape, dtype=dtype, gen=g)
    p, b = param.to(device, copy=True), buf.to(device, copy=True)
    edfkern.dae_sgd_step_(p, grad.to(device), b, cam.to(device), lr=0.1, beta=1.0, momentum=0.5, weight_decay=0.01)
    assert p.dtype == dtype and b.dtype == dtype
    mask, amb = oracle_mask(cam, shape[2:4], 1.0, None)
    d = grad.double() * mask + 0.01 * param.double()
    b_exp = 0.5 * buf.double() + d
    keep = ~amb.expand_as(d)
    assert_close(b.cpu()[keep], b_exp[keep], *STORE_TOL[dtype], name="buf")
    # torch.optim.SGD updates param with the buffer as stored (rounded to its dtype); using the op's own
    # stored buffer here keeps the check to one rounding of param instead of lr * (buffer rounding)
    p_exp = param.double() - 0.1 * b.cpu().double()
    assert_close(p.cpu()[keep], p_exp[keep], *STORE_TOL[dtype], name="param")


def test_dae_sgd_step_noncontiguous(backend, device):
    shape = (2, 3, 8, 6, 2, 2)
    grad, cam = _inputs(shape, torch.float32, seed=7)
    param = rand(*grad.shape, gen=torch.Generator().manual_seed(8))
    buf = torch.zeros_like(param)
    p_nc, b_nc = noncontig(param.to(device)), noncontig(buf.to(device))
    edfkern.dae_sgd_step_(p_nc, noncontig(grad.to(device)), b_nc, cam.to(device), lr=1.0, beta=1.0, first_step=True)
    p, b = param.to(device).clone(), buf.to(device).clone()
    edfkern.dae_sgd_step_(p, grad.to(device), b, cam.to(device), lr=1.0, beta=1.0, first_step=True)
    assert_close(p_nc, p, 0, 0, "param")
    assert_close(b_nc, b, 0, 0, "buf")


# ----------------------------------------------------------------------------- bad input


def test_dae_bad_inputs_raise_and_write_nothing():
    grad = torch.randn(4, 3, 8, 8)
    before = grad.clone()
    cam = torch.rand(4, 2, 2)
    cases = [
        (lambda: edfkern.dae_(grad, torch.rand(3, 2, 2), beta=1.0), ValueError, "cam"),
        (lambda: edfkern.dae_(grad, torch.rand(4, 2), beta=1.0), ValueError, "cam"),
        (lambda: edfkern.dae_(grad[0], cam, beta=1.0), ValueError, "grad"),
        (lambda: edfkern.dae_(grad.long(), cam, beta=1.0), TypeError, "grad"),
        (lambda: edfkern.dae_(grad, cam.long(), beta=1.0), TypeError, "cam"),
        (lambda: edfkern.dae_(grad, cam, beta="x"), TypeError, "beta"),
        (lambda: edfkern.dae_(grad, cam, beta=float("nan")), ValueError, "beta"),
        (lambda: edfkern.dae_(grad, cam, beta=1.0, threshold=float("inf")), ValueError, "threshold"),
        (lambda: edfkern.dae_(grad, cam.to("meta"), beta=1.0), ValueError, "device"),
        (lambda: edfkern.dae_(grad, torch.rand(4, 0, 2), beta=1.0), ValueError, "cam"),
        (lambda: edfkern.dae_mask(cam, beta=1.0, size=(0, 3)), ValueError, "size"),
        (lambda: edfkern.dae_mask(cam, beta=1.0, size=8), ValueError, "size"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()
    assert torch.equal(grad, before)


def test_dae_sgd_step_bad_inputs_write_nothing():
    p, g, b, cam = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2, 2, 2)
    p0, b0 = p.clone(), b.clone()
    cases = [
        (dict(momentum_buffer=None), ValueError, "momentum_buffer"),
        (dict(grad=torch.randn(2, 3, 4, 5)), ValueError, "grad"),
        (dict(grad=g.double()), TypeError, "grad"),
        (dict(momentum_buffer=b.half()), TypeError, "momentum_buffer"),
        (dict(momentum_buffer=torch.randn(2, 3, 4)), ValueError, "momentum_buffer"),
        (dict(cam=torch.rand(3, 2, 2)), ValueError, "cam"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(nesterov=True, dampening=0.1), ValueError, "nesterov"),
    ]
    for override, exc, word in cases:
        kw = dict(param=p, grad=g, momentum_buffer=b, cam=cam)
        kw.update({k: v for k, v in override.items() if k in kw})
        opts = {k: v for k, v in override.items() if k not in kw}
        with pytest.raises(exc, match=word):
            edfkern.dae_sgd_step_(kw["param"], kw["grad"], kw["momentum_buffer"], kw["cam"],
                                  **{"lr": 1.0, "beta": 1.0, **opts})
    assert torch.equal(p, p0) and torch.equal(b, b0)


def test_dae_refuses_grad_that_requires_grad():
    g = torch.randn(2, 1, 4, 4, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="grad must not require grad"):
        edfkern.dae_(g, torch.rand(2, 2, 2), beta=1.0)


def test_dae_mask_has_no_gradient_wrt_cam():
    cam = torch.rand(2, 3, 3, requires_grad=True)
    m = edfkern.dae_mask(cam, beta=1.0, size=(6, 6))
    with pytest.raises(RuntimeError, match="no gradient"):
        m.sum().backward()


def test_dae_mask_threshold_is_inclusive(backend, device):
    """``>=``: an all-zero map (torchcam's output for a flat map) equals its mean 0, so every pixel gets ``beta``;
    a map equal to a fixed threshold takes ``value + beta`` too."""
    cam = torch.zeros(2, 3, 3)
    m = edfkern.dae_mask(cam.to(device), beta=2.0, size=(7, 5))
    assert torch.equal(m.cpu(), torch.full((2, 1, 7, 5), 2.0))
    cam = torch.full((2, 3, 3), 0.25)
    m = edfkern.dae_mask(cam.to(device), beta=1.0, threshold=0.25)
    assert torch.equal(m.cpu(), torch.full((2, 1, 3, 3), 1.25))


def test_dae_fp64_grad_with_fp32_cam_computes_in_fp64(backend, device):
    grad, _ = _inputs((2, 3, 9, 7, 3, 3), torch.float64, seed=21)
    cam = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(22))  # float32 CAM
    g = grad.to(device, copy=True)
    edfkern.dae_(g, cam.to(device), beta=1.0)
    mask, amb = oracle_mask(cam, (9, 7), 1.0, None)
    keep = ~amb.expand_as(grad)
    assert_close(g.cpu()[keep], (grad * mask)[keep], 1e-12, 1e-14, "fp64 grad, fp32 cam")


def _largest_allocation(fn) -> int:
    """Largest single CPU tensor allocation (bytes) made while ``fn`` runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: caches, lazy imports, kernel compilation
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0], default=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="profiles CPU allocations; on CUDA the bench measures workspace")
def test_fused_dae_never_materialises_the_mask(backend):
    """docs/benchmarks.md: workspace O(N*h*w). The fused backends allocate at most per-image thresholds;
    the reference (the oracle) materialises the upsampled map and the mask, and the check shows it."""
    n, c, H, W = 6, 3, 64, 48
    grad, cam = rand(n, c, H, W), torch.rand(n, 4, 4)
    param, buf = rand(n, c, H, W), rand(n, c, H, W)
    mask_bytes = n * H * W * 4
    big = max(_largest_allocation(lambda: edfkern.dae_(grad, cam, beta=1.0)),
              _largest_allocation(lambda: edfkern.dae_sgd_step_(param, grad, buf, cam, lr=1.0, beta=1.0)))
    if backend == "reference":
        assert big >= mask_bytes
    else:
        assert big <= 64 * n, f"{backend} allocated {big} bytes; the mask would be {mask_bytes}"
