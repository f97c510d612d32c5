"""The backend kernel contract: every function of each fused backend (``native``, ``triton``) against
``edfkern.reference``, called directly (the op-level suites run the registered ops on every backend).

One file, one group builder, one tolerance convention:

- results below float64 follow the project's rule (``tests/_utils.py::assert_fp_rule``): at most 2x
  as far from the float64 oracle (the reference kernel on the same inputs promoted to float64) as
  the reference kernel itself in the input precision (plain PyTorch), plus a few-ulp floor;
- float64 results are compared with the float64 reference at 1e-10 relative;
- integer and boolean results (CPD's tie index and keep-set) must be identical;
- DAE pixels within rounding of their image's threshold may flip between ``1`` and ``value + beta``
  and are left out (at most a few percent of a small test image, counted).

Small odd shapes (the Triton interpreter is slow), all four dtypes, label groups with a non-identity
permutation and an empty group, CPD ties at the threshold and k == 0. Tests marked ``gpu`` use
the large shapes of the benchmark configurations and run only on CUDA.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest does this too; must precede the triton import

import edfkern  # noqa: E402
import edfkern.reference as R  # noqa: E402
from edfkern.reference._common import upsample  # noqa: E402
from tests._utils import DTYPES, assert_close, assert_fp_rule  # noqa: E402
from tests.opinfo import OP, OPS, csr  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = ("native", "triton")


def _backend_param(name: str):
    info = edfkern.backends()[name]
    ok = info["available"] and DEVICE in info["devices"]
    why = info["reason"] if not info["available"] else f"cannot take {DEVICE} tensors"
    return pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {why}"))


@pytest.fixture(params=[_backend_param(n) for n in FUSED])
def K(request):
    """The fused backend's kernel module (``edfkern.native`` or ``edfkern.triton``)."""
    return importlib.import_module(f"edfkern.{request.param}")


# ----------------------------------------------------------------------------- shared helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).to(DEVICE)


def groups(kind: str, n: int, k: int, seed: int) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """``(n_rows, perm, offsets)`` in the CSR form kernels take.

    ``"equal"``: K contiguous blocks of ``n // k`` rows, ``perm=None``. ``"labels"``: shuffled labels in
    ``[0, k)`` that need a permutation, with group 1 empty (``k >= 3``).
    """
    if kind == "equal":
        ipc = max(1, n // k)
        return ipc * k, None, (torch.arange(k + 1, dtype=torch.int64) * ipc).to(DEVICE)
    labels = torch.randint(0, k, (n,), generator=_gen(seed))
    labels[labels == 1] = 0
    labels[0], labels[-1] = k - 1, 0  # never already sorted
    perm, offsets = csr(labels, k)
    return n, perm.to(DEVICE), offsets.to(DEVICE)


def _promote(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def vs_reference(got, fn: str, *args, name: str = "", index=None, floor_ulps=None, also=()) -> None:
    """Judge ``got`` (one output of ``K.<fn>(*args)``) against the reference kernel.

    ``index`` picks the output of a multi-output kernel. Below float64: the tolerance rule, with the
    oracle ``R.<fn>`` on the arguments promoted to float64 and plain PyTorch ``R.<fn>(*args)``; ``also``
    adds further plain results (the same formula summed in another order) for ill-conditioned outputs.
    """
    pick = (lambda r: r) if index is None else (lambda r: r[index])
    plain = pick(getattr(R, fn)(*args))
    assert got.shape == plain.shape and got.dtype == plain.dtype, (
        f"{name}: {tuple(got.shape)} {got.dtype} vs the reference's {tuple(plain.shape)} {plain.dtype}")
    if got.dtype == torch.float64:
        assert_close(got, plain, 1e-10, 1e-12 * max(1.0, plain.abs().max().item()), name)
        return
    oracle = pick(getattr(R, fn)(*map(_promote, args)))
    assert_fp_rule(got, oracle, [plain, *also], name, floor_ulps=floor_ulps)


# ----------------------------------------------------------------------------- every op's kernel calls

KERNEL_CALLS = [(op.name, label, kernel) for op in OPS for label, kernel, _ in op.kernel_calls(torch.float32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,label,kernel", KERNEL_CALLS, ids=[f"{k}-{lab}" for _, lab, k in KERNEL_CALLS])
def test_kernel_calls_of_the_op_table(K, dtype, op, label, kernel):
    """Each call of ``kernel_calls`` in tests/opinfo.py: floating outputs by the tolerance rule against the
    reference kernel, integer and boolean outputs identical."""
    args = next(a for lab, k, a in OP[op].kernel_calls(dtype) if (lab, k) == (label, kernel))
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    got, exp = getattr(K, kernel)(*args), getattr(R, kernel)(*args)
    assert isinstance(got, tuple) == isinstance(exp, tuple), f"{kernel}: {type(got)} where the reference gives {type(exp)}"
    if isinstance(got, tuple):
        assert len(got) == len(exp), f"{kernel}: {len(got)} outputs, the reference gives {len(exp)}"
    outs = list(zip(got, exp)) if isinstance(got, tuple) else [(got, exp)]
    for i, (g, e) in enumerate(outs):
        name = f"{kernel} output {i}"
        if g.is_floating_point():
            vs_reference(g, kernel, *args, name=name, index=i if isinstance(got, tuple) else None)
        else:
            assert g.dtype == e.dtype and torch.equal(g, e), f"{name}: {g} != {e}"


# ----------------------------------------------------------------------------- DAE


def near_threshold(cam: torch.Tensor, threshold, H: int, W: int) -> torch.Tensor:
    """(N, H, W) bool: pixels whose U(cam) lies within rounding of tau (they may flip)."""
    acc = torch.float64 if cam.dtype == torch.float64 else torch.float32
    u = upsample(cam.to(acc), (H, W))
    tau = u.mean(dim=(1, 2), keepdim=True) if threshold is None else torch.tensor(threshold, dtype=acc)
    tol = 1e-12 if acc == torch.float64 else 1e-5
    return (u - tau).abs() <= tol * (1 + tau.abs())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OP["dae_mask"].contract["shapes"], ids=str)
@pytest.mark.parametrize("threshold", OP["dae_mask"].contract["thresholds"], ids=str)
def test_dae_mask_and_scale(K, dtype, shape, threshold):
    n, c, h, w, H, W = shape
    cam = rand(n, h, w, dtype=dtype, seed=sum(shape))
    if (h, w) == (1, 1) and threshold is None:
        cam = rand(n, 2, 2, dtype=dtype, seed=1)  # a flat map sits on its mean: tests/test_special_values.py
        h = w = 2
    far = ~near_threshold(cam, threshold, H, W)
    assert (~far).float().mean() < 0.05
    got = K.dae_mask(cam, 1.5, threshold, H, W)
    assert got.shape == (n, 1, H, W) and got.dtype == cam.dtype
    exp, oracle = R.dae_mask(cam, 1.5, threshold, H, W), R.dae_mask(cam.double(), 1.5, threshold, H, W)
    if dtype == torch.float64:
        assert_close(got[:, 0][far], exp[:, 0][far], 1e-10, 1e-12, "dae_mask")
    else:
        assert_fp_rule(got[:, 0][far], oracle[:, 0][far], exp[:, 0][far], "dae_mask")

    grad = randn(n, c, H, W, dtype=dtype, seed=3)
    g1, g2 = grad.clone(), grad.clone()
    K.dae_(g1, cam, 1.5, threshold)
    R.dae_(g2, cam, 1.5, threshold)
    sel = far[:, None].expand_as(g1)
    if dtype == torch.float64:
        assert_close(g1[sel], g2[sel], 1e-10, 1e-12, "dae_")
    else:
        g3 = grad.double()
        R.dae_(g3, cam.double(), 1.5, threshold)
        assert_fp_rule(g1[sel], g3[sel], g2[sel], "dae_")


def test_dae_mixed_dtypes(K):
    """An fp16 gradient with an fp64 CAM: the mask math runs in fp64, the product is stored in fp16."""
    grad = randn(2, 3, 8, 8, dtype=torch.float16, seed=1)
    cam = rand(2, 3, 3, dtype=torch.float64, seed=2)
    g1, g2 = grad.clone(), grad.clone()
    K.dae_(g1, cam, 1.0, None)
    R.dae_(g2, cam, 1.0, None)
    far = (~near_threshold(cam, None, 8, 8))[:, None].expand_as(g1)
    g3 = grad.double()
    R.dae_(g3, cam, 1.0, None)
    assert_fp_rule(g1[far], g3[far], g2[far], "dae_ fp16 grad / fp64 cam")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", OP["dae_sgd_step_"].contract["configs"], ids=str)
@pytest.mark.parametrize("identity", [False, True], ids=["upsampled", "identity"])
def test_dae_sgd_step(K, dtype, cfg, identity):
    momentum, dampening, wd, nesterov, maximize, first = cfg
    n, c, H, W = 3, 2, 11, 13
    h, w = (H, W) if identity else (4, 3)
    threshold = 0.45 if identity else None
    cam = rand(n, h, w, dtype=dtype, seed=5)
    grad = randn(n, c, H, W, dtype=dtype, seed=6)
    param = randn(n, c, H, W, dtype=dtype, seed=7)
    buf = randn(n, c, H, W, dtype=dtype, seed=8) if momentum else None
    args = (100.0, 1.5, threshold, momentum, dampening, wd, nesterov, maximize, first)

    def step(module, promote=False):
        cv = (lambda t: None if t is None else t.double()) if promote else (lambda t: None if t is None else t.clone())
        p, b = cv(param), cv(buf)
        module.dae_sgd_step_(p, cv(grad), b, cv(cam), *args)
        return p, b

    g0 = grad.clone()
    p1, b1 = param.clone(), None if buf is None else buf.clone()
    K.dae_sgd_step_(p1, grad, b1, cam, *args)  # the caller's own grad: it must stay untouched
    assert torch.equal(grad, g0), "grad must be left untouched"
    p2, b2 = step(R)
    if identity and K.__name__ == "edfkern.triton":
        # U is the identity and the threshold fixed: Triton runs the reference's fp ops, bit for bit
        assert torch.equal(p1, p2), f"param: {(p1 != p2).sum()} elements differ"
        assert buf is None or torch.equal(b1, b2), "buf differs"
    far = (~near_threshold(cam, threshold, H, W))[:, None].expand_as(p1)
    if dtype == torch.float64:
        assert_close(p1[far], p2[far], 1e-10, 1e-10, "param")
        if buf is not None:
            assert_close(b1[far], b2[far], 1e-10, 1e-12, "buf")
        return
    p3, b3 = step(R, promote=True)
    assert_fp_rule(p1[far], p3[far], p2[far], "param")
    if buf is not None:
        assert_fp_rule(b1[far], b3[far], b2[far], "buf")


# ----------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", OP["grad_cam"].contract["methods"])
@pytest.mark.parametrize("size", OP["grad_cam"].contract["sizes"], ids=str)
@pytest.mark.parametrize("hw", OP["grad_cam"].contract["hw"], ids=str)
def test_grad_cam(K, dtype, method, size, hw, request):
    if K.__name__ == "edfkern.triton" and method == "gradcam++" and (dtype, hw) in (
            (torch.bfloat16, (5, 3)), (torch.float16, (4, 4))):
        # Known defect, kept visible: on these half-precision-valued inputs Triton's tile reductions
        # (the interpreter's, and the same with the values given as fp32) land 2.9e-4 (bf16, 5x3) and
        # 2.1e-3 (fp16, 4x4, normalize=False) from fp64, where every plain float32 order tried lands
        # within 4.4e-5 and 3.5e-4: 6x the plain error. Not yet explained; see benchmarks/NOTES.md.
        request.applymarker(pytest.mark.xfail(strict=True, reason="triton gradcam++ accuracy on an ill-conditioned input"))
    (h, w), s, n, c = hw, 3, 2, 37
    A = rand(s, n, c, h, w, dtype=dtype, seed=1)  # activations after a ReLU
    G = randn(s, n, c, h, w, dtype=dtype, seed=2)
    Ac = rand(n, c, h, w, dtype=dtype, seed=3) if method == "smoothgradcam++" else None
    if method != "smoothgradcam++":
        A, G = A[0], G[0]
    for normalize in (True, False):
        got = K.grad_cam(A, G, Ac, method, normalize, size)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # gradcam++'s alpha has a denominator 2G^2 + sum(A G^3) that nearly cancels on some channels:
        # the plain bar also counts the same formula summed in reversed (h, w) and channel orders
        vs_reference(got, "grad_cam", A, G, Ac, method, normalize, size, name=f"{method} normalize={normalize}",
                     also=[_grad_cam_reordered(A, G, Ac, method, normalize, size, dims)
                           for dims in ((-1, -2), (-3,), (-3, -1, -2))])


def _grad_cam_reordered(A, G, Ac, method, normalize, size, dims):
    """The reference on inputs flipped along ``dims`` (positions and/or channels), the map flipped back:
    the same formula, every sum taken in another order."""
    flip = (lambda t: None if t is None else t.flip(dims))
    out = R.grad_cam(flip(A), flip(G), flip(Ac), method, normalize, size)
    spatial = tuple(d for d in dims if d in (-1, -2))
    return out.flip(spatial) if spatial else out


# ----------------------------------------------------------------------------- CPD


def cpd_inputs(p: int, mode: str, dtype, seed: int):
    s0 = randn(p, dtype=dtype, seed=seed + 2)
    if mode == "random":
        return randn(p, dtype=dtype, seed=seed), randn(p, dtype=dtype, seed=seed + 1), s0
    # integer differences: l takes ~4 values, so the threshold value is tied many times over
    diff = torch.randint(-3, 4, (p,), generator=_gen(seed)).to(dtype).to(DEVICE)
    target = randn(p, dtype=dtype, seed=seed + 1).round()
    return target + diff, target, s0


def stable_sort_keep(l: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(l.numel(), dtype=torch.bool, device=l.device)
    keep[torch.sort(l, stable=True).indices[:k]] = False
    return keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", OP["cpd_trajectory_loss"].contract["P"])
@pytest.mark.parametrize("mode", OP["cpd_trajectory_loss"].contract["modes"])
def test_cpd_forward_backward(K, dtype, p, mode):
    student, target, start = cpd_inputs(p, mode, dtype, seed=p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    l = (student.to(acc) - target.to(acc)) ** 2
    for ratio in OP["cpd_trajectory_loss"].contract["ratios"]:
        k = int(ratio * p)
        sl, sd, thr, tie = K.cpd_forward(student, target, start, k)
        rsl, rsd, rthr, rtie = R.cpd_forward(student, target, start, k)
        assert all(v.dim() == 0 for v in (sl, sd, thr, tie)) and tie.dtype == torch.int64 and thr.dtype == acc
        assert torch.equal(thr, rthr) and torch.equal(tie, rtie), f"k={k}: thr/tie {thr, tie} != {rthr, rtie}"
        if k == 0:
            assert thr.item() == float("-inf") and tie.item() == 0
        keep = ~((l < thr) | ((l == thr) & (torch.arange(p, device=l.device) < tie)))
        assert torch.equal(keep, stable_sort_keep(l, k)), f"k={k}: keep-set differs from a stable sort"
        vs_reference(sl, "cpd_forward", student, target, start, k, name="sum_l", index=0)
        vs_reference(sd, "cpd_forward", student, target, start, k, name="sum_d", index=1)
        g = torch.tensor(0.75, dtype=acc, device=DEVICE)
        got = K.cpd_backward(g, student, target, start, rthr, rtie, rsd)
        assert torch.equal(got != 0, keep & (student != target)), "gradient support must be the kept set"
        vs_reference(got, "cpd_backward", g, student, target, start, rthr, rtie, rsd, name="cpd_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", OP["cpd_keep_mask"].contract["P"])
@pytest.mark.parametrize("mode", OP["cpd_keep_mask"].contract["modes"])
def test_cpd_keep_mask(K, dtype, p, mode):
    if mode == "random":
        l = randn(p, dtype=dtype, seed=p)  # negative values too: other DD methods pass any losses
    else:
        l = torch.randint(-2, 3, (p,), generator=_gen(p)).to(dtype).to(DEVICE)
        l[l == 0] = -0.0 if p % 2 else 0.0
        l[::3] = 0.0  # -0.0 and +0.0 tie
    for ratio in OP["cpd_keep_mask"].contract["ratios"]:
        k = int(ratio * p)
        got = K.cpd_keep_mask(l, k)
        assert got.dtype == torch.bool and got.shape == l.shape
        exp = stable_sort_keep(l, k)
        assert torch.equal(got, exp), f"k={k}: {(got != exp).sum()} indices differ from a stable sort"
        assert torch.equal(R.cpd_keep_mask(l, k), exp)


# ----------------------------------------------------------------------------- covariance and flat features


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OP["local_covariance"].contract["cases"], ids=str)
def test_covariance(K, dtype, case):
    n, c, L, k, kind = case
    n, perm, offsets = groups(kind, n, k, seed=n)
    x = randn(n, c, L, dtype=dtype, seed=c) + 0.5
    sigma, mean = K.cov_forward(x, perm, offsets)
    vs_reference(mean, "cov_forward", x, perm, offsets, name="mean", index=1)
    vs_reference(sigma, "cov_forward", x, perm, offsets, name="sigma", index=0)
    if kind == "labels":
        assert sigma[1].abs().max() == 0 and mean[1].abs().max() == 0, "an empty group must give zeros"
    rsigma, rmean = R.cov_forward(x, perm, offsets)
    M = randn(k, c, c, dtype=rsigma.dtype, seed=9)
    got = K.cov_backward(x, perm, offsets, rmean, M)
    assert got.dtype == dtype
    vs_reference(got, "cov_backward", x, perm, offsets, rmean, M, name="cov_backward")


def test_covariance_many_blocks(K):
    """More rows per class than one GEMM block holds, and a large L."""
    n, perm, offsets = groups("labels", 2000, 3, seed=4)
    x = randn(n, 9, 17, seed=6)
    sigma, mean = K.cov_forward(x, perm, offsets)
    vs_reference(sigma, "cov_forward", x, perm, offsets, name="sigma", index=0)
    M = randn(3, 9, 9, seed=7)
    vs_reference(K.cov_backward(x, perm, offsets, mean, M), "cov_backward", x, perm, offsets, mean, M, name="grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OP["local_covariance"].contract["l16_cases"], ids=str)
def test_covariance_l_multiple_of_16(K, dtype, case):
    """L a multiple of 16: the native CPU kernel's vector path on AVX-512 builds (other L and fp64
    take the BLAS path). Channel counts that are not multiples of its 4x6 / 8-row tiles, a perm, many
    rows per class, an empty class (n=9 over K=3 labels may leave one empty) and every dtype."""
    n, c, L, k, kind = case
    n, perm, offsets = groups(kind, n, k, seed=L + c)
    x = randn(n, c, L, dtype=dtype, seed=c) + 0.5
    sigma, mean = K.cov_forward(x, perm, offsets)
    vs_reference(sigma, "cov_forward", x, perm, offsets, name="sigma", index=0)
    vs_reference(mean, "cov_forward", x, perm, offsets, name="mean", index=1)
    M = randn(k, c, c, dtype=sigma.dtype, seed=3)
    M = M + M.transpose(1, 2)  # the loss's M is symmetric; the kernel must not assume it
    M[0, 0, 1] += 1.0
    got = K.cov_backward(x, perm, offsets, mean, M)
    assert got.dtype == dtype
    vs_reference(got, "cov_backward", x, perm, offsets, mean, M, name="cov_backward")


def test_covariance_allow_tf32_flag_reaches_triton():
    if "triton" not in [n for n, i in edfkern.backends().items() if i["available"] and DEVICE in i["devices"]]:
        pytest.skip("triton unavailable")
    import edfkern.triton as T

    n, perm, offsets = groups("labels", 9, 3, seed=1)
    x = randn(n, 17, 4, seed=2)
    old = edfkern.config.allow_tf32
    try:
        edfkern.config.allow_tf32 = True
        assert T._utils.dot_precision() == "tf32"  # the flag reaches the kernels' tl.dot
        sigma, _ = T.cov_forward(x, perm, offsets)
    finally:
        edfkern.config.allow_tf32 = old
    assert T._utils.dot_precision() == "ieee"
    assert_close(sigma, R.cov_forward(x, perm, offsets)[0], 1e-2, 1e-3, name="tf32 sigma")  # TF32: ~1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OP["class_centralization_loss"].contract["cases"], ids=str)
def test_flat_features(K, dtype, case):
    n, d, k, kind = case
    n, perm, offsets = groups(kind, n, k, seed=d)
    x = randn(n, d, dtype=dtype, seed=n) + 1.0
    vs_reference(K.seg_mean(x, perm, offsets), "seg_mean", x, perm, offsets, name="seg_mean")
    sq, mean = K.cc_forward(x, perm, offsets)
    assert sq.dim() == 0
    vs_reference(sq, "cc_forward", x, perm, offsets, name="cc sum", index=0)
    vs_reference(mean, "cc_forward", x, perm, offsets, name="cc mean", index=1)
    rmean = R.cc_forward(x, perm, offsets)[1]
    g = torch.tensor(0.3, dtype=rmean.dtype, device=DEVICE)
    got = K.cc_backward(g, x, perm, offsets, rmean, 0.1)
    assert got.dtype == dtype
    vs_reference(got, "cc_backward", g, x, perm, offsets, rmean, 0.1, name="cc_backward")


# ----------------------------------------------------------------------------- dispatch and registration


def test_dispatch_reaches_every_kernel(K):
    """Under ``use_backend(name)`` every contract function resolves to that backend's own function."""
    from edfkern._dispatch import kernel

    name = K.__name__.rsplit(".", 1)[1]
    with edfkern.use_backend(name):
        for fn in R.__all__:
            assert kernel(fn, torch.device(DEVICE)).__wrapped__ is getattr(K, fn), fn


def _native_module():
    if not edfkern.backends()["native"]["available"]:
        pytest.skip("native unavailable")
    return importlib.import_module("edfkern.native")


def _doc_arg_names(fn) -> list[str]:
    """Argument names from a pybind11 function's signature line: ``name(a: T, b: U = ...) -> R``."""
    head = fn.__doc__.splitlines()[0]
    inner = head[head.index("(") + 1:head.rindex(") ->")]
    names, depth, cur = [], 0, ""
    for ch in inner + ",":
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            names.append(cur.split(":")[0].strip())
            cur = ""
        else:
            cur += ch
    return [n for n in names if n]


def test_native_functions_are_the_extensions_with_the_contract_arguments():
    """edfkern.native re-exports edfkern._C's functions as they are; each one takes the reference
    kernel's arguments, by the same names, in the same order (the backend contract)."""
    import inspect

    native = _native_module()
    C = importlib.import_module("edfkern._C")
    assert sorted(native.__all__) == sorted(R.__all__)
    for name in R.__all__:
        fn = getattr(native, name)
        assert fn is getattr(C, name), name
        assert fn.__module__ == "edfkern._C", (name, fn.__module__)
        expected = list(inspect.signature(getattr(R, name)).parameters)
        assert _doc_arg_names(fn) == expected, f"{name}: {_doc_arg_names(fn)} != {expected}"
        # and by keyword: the names are usable, not only documented
    cam = torch.rand(2, 3, 3)
    by_kw = native.dae_mask(cam=cam, beta=1.0, threshold=None, H=5, W=4)
    assert torch.equal(by_kw, native.dae_mask(cam, 1.0, None, 5, 4))


def test_native_functions_refuse_fake_and_meta_tensors():
    """Plain functions see what they are given: a FakeTensor (which claims the CPU) or a meta tensor gets a
    ValueError before any data pointer is read. (The fake path of the public ops is edfkern::'s register_fake.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    native = _native_module()
    with FakeTensorMode():
        x, offsets = torch.empty(6, 4, 3), torch.tensor([0, 3, 6])
        cases = [
            lambda: native.cov_forward(x, None, offsets),
            lambda: native.dae_mask(torch.empty(2, 3, 3), 1.0, None, 8, 8),
            lambda: native.cpd_keep_mask(torch.empty(10), 3),
        ]
        for fn in cases:
            with pytest.raises(ValueError, match="FakeTensor"):
                fn()
    with pytest.raises(ValueError, match="meta"):
        native.seg_mean(torch.empty(6, 4, device="meta"), None, torch.tensor([0, 6], device="meta"))
    with pytest.raises(ValueError, match="meta"):
        native.dae_(torch.empty(2, 3, 4, 4, device="meta"), torch.empty(2, 3, 3, device="meta"), 1.0, None)


# ----------------------------------------------------------------------------- GPU only: big shapes


@pytest.mark.gpu
def test_dae_int64_offsets_gpu(K):
    """N*C*H*W > 2^31: offsets must be int64 (bf16 keeps it at ~4.3 GB per tensor)."""
    n, c, H, W = 2, 4, 16384, 16385
    assert n * c * H * W > 2 ** 31
    cam = torch.rand(n, 4, 4, device="cuda")
    grad = torch.ones(n, c, H, W, device="cuda", dtype=torch.bfloat16)
    K.dae_(grad, cam, 1.0, 0.5)
    mask = R.dae_mask(cam, 1.0, 0.5, H, W)  # (n, 1, H, W) in fp32
    last = (grad[-1, -1, -64:, -64:].float() - mask[-1, 0, -64:, -64:].to(torch.bfloat16).float()).abs().max()
    assert last == 0


@pytest.mark.gpu
def test_dae_sgd_step_imagenette_gpu(K):
    n, c, H, W = 500, 3, 128, 128
    cam = torch.rand(n, 4, 4, device="cuda")
    grad, param, buf = (torch.randn(n, c, H, W, device="cuda") for _ in range(3))
    p1, p2, b1, b2 = param.clone(), param.clone(), buf.clone(), buf.clone()
    K.dae_sgd_step_(p1, grad, b1, cam, 100.0, 1.0, None, 0.5, 0.0, 0.0, False, False, False)
    R.dae_sgd_step_(p2, grad, b2, cam, 100.0, 1.0, None, 0.5, 0.0, 0.0, False, False, False)
    assert ((p1 - p2).norm() / p2.norm()).item() < 1e-5  # relative norm: threshold pixels may flip
    assert ((b1 - b2).norm() / b2.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("p", [615_690, 11_200_000])
def test_cpd_large_gpu(K, p):
    student, target, start = (torch.randn(p, device="cuda") for _ in range(3))
    k = int(0.375 * p)
    got = K.cpd_forward(student, target, start, k)
    exp = R.cpd_forward(student, target, start, k)
    assert torch.equal(got[2], exp[2]) and torch.equal(got[3], exp[3])
    vs_reference(got[0], "cpd_forward", student, target, start, k, name="sum_l", index=0)


@pytest.mark.gpu
def test_covariance_cifar10_ipc1000_gpu(K):
    n, c, L, k = 10_000, 128, 16, 10
    x = torch.randn(n, c, L, device="cuda")
    offsets = torch.arange(k + 1, device="cuda") * (n // k)
    sigma, mean = K.cov_forward(x, None, offsets)
    vs_reference(sigma, "cov_forward", x, None, offsets, name="sigma", index=0)
    M = torch.randn(k, c, c, device="cuda")
    vs_reference(K.cov_backward(x, None, offsets, mean, M), "cov_backward", x, None, offsets, mean, M, name="grad")


def test_native_covariance_backward_with_huge_pages():
    """EDFKERN_HUGEPAGES=1 (read once per process): the native CPU backward's large output is backed
    by transparent huge pages; the gradient must be the same bits as with ordinary pages."""
    if "native" not in [n for n, i in edfkern.backends().items() if i["available"] and "cpu" in i["devices"]]:
        pytest.skip("native unavailable")
    import subprocess
    import sys

    code = (
        "import torch, edfkern.native as N\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3000, 64, 16, generator=g)\n"  # 12 MB output: above the 4 MB huge-page threshold
        "off = torch.tensor([0, 1000, 2000, 3000])\n"
        "sig, mean = N.cov_forward(x, None, off)\n"
        "M = torch.randn(3, 64, 64, generator=g)\n"
        "out = N.cov_backward(x, None, off, mean, M)\n"
        "torch.save(out, __import__('sys').argv[1])\n"
    )
    outs = []
    for flag in ("0", "1"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"edfkern-hp-{os.getpid()}-{flag}.pt")
        env = dict(os.environ, EDFKERN_HUGEPAGES=flag)
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=300)
        outs.append(torch.load(path))
        os.remove(path)
    assert torch.equal(outs[0], outs[1])
    assert outs[1].abs().max() > 0
