"""Special values and degenerate CAMs (docs/special-values.md), on every backend.

Class 1, ``test_nan_inf_like_loop_*``: NaN and +-inf come out where, and with the sign, the loop
formulation (``edfkern.baselines``) gives them; nothing turns them into finite numbers. The finite
entries of those results are compared loosely (their accuracy is tested in the op test files).

Class 2, ``test_flat_cam_rule*``: a flat (constant, finite) CAM upsamples to its value exactly and is
its own mean, so the mean-threshold mask is ``c + beta`` everywhere, bit for bit on every backend and
in the loop; with a fixed threshold every pixel is decided the same way. Non-flat maps may flip a
pixel sitting on the threshold between backends, and ``test_threshold_flips_between_backends_bounded``
bounds how many.
"""
from __future__ import annotations

import pytest
import torch

import edfkern
from tests._utils import DTYPES, assert_same_special, rand
from tests.opinfo import INF, NAN, NEG_NAN, OP, SPECIALS, flat_rule_mask, nan_payloads, sprinkle


def fp32_loop(dtype: torch.dtype) -> torch.dtype:
    """The Grad-CAM and DAE loops compute in float32 whatever the input dtype: their tolerance."""
    return torch.float32 if dtype == torch.float64 else dtype


# ----------------------------------------------------------------------------- class 1: CPD


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OP["cpd_trajectory_loss"].special["cases"], ids=lambda c: "-".join(map(str, c)))
def test_nan_inf_like_loop_cpd(backend, device, dtype, case):
    where, kind, P, ratio = case
    gen = torch.Generator().manual_seed(P)
    s, t, s0 = (rand(P, dtype=dtype, gen=gen) for _ in range(3))
    if where == "s=t=inf":  # l = (inf - inf)^2 is a NaN with the sign bit set
        m = torch.rand(P, generator=gen) < 0.4
        s[m], t[m] = INF, INF
    else:
        v = {"student": s, "target": t, "start": s0}[where]
        v.copy_(sprinkle(v, SPECIALS[kind], gen, 0.2))
    sb = s.clone().requires_grad_(True)
    loop = OP["cpd_trajectory_loss"].baseline(sb, t, s0, drop_ratio=ratio)
    loop.backward()
    sa = s.to(device).requires_grad_(True)
    loss = edfkern.cpd_trajectory_loss(sa, t.to(device), s0.to(device), drop_ratio=ratio)
    loss.backward()
    assert_same_special(loss, loop, dtype, "loss")
    assert_same_special(sa.grad, sb.grad, dtype, "grad")
    if where != "start":
        assert not torch.isfinite(loss), "a NaN/inf loss entry is always kept (it sorts last), so the loss is not finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", OP["cpd_keep_mask"].special["ratios"])
def test_nan_inf_like_loop_cpd_keep_mask(backend, device, dtype, ratio):
    """Every NaN (either sign, any payload) sorts after +inf and NaNs tie by index, as torch.sort(stable=True)."""
    gen = torch.Generator().manual_seed(int(ratio * 100))
    for trial in range(4):
        P = OP["cpd_keep_mask"].special["P"][trial]
        l = rand(P, dtype=dtype, gen=gen).round()  # many ties
        pos = torch.randperm(P, generator=gen)
        n_nan, n_inf = max(1, P // 3), max(1, P // 8)
        l[pos[:n_nan]] = nan_payloads(n_nan, dtype, gen)
        l[pos[n_nan:n_nan + n_inf]] = INF
        l[pos[n_nan + n_inf:n_nan + 2 * n_inf]] = -INF
        l[pos[-1]] = -0.0
        expected = OP["cpd_keep_mask"].baseline(l, ratio)
        got = edfkern.cpd_keep_mask(l.to(device), ratio).cpu()
        assert torch.equal(got, expected), f"trial {trial}: {(got != expected).nonzero().flatten().tolist()}"


def test_nan_inf_like_loop_cpd_kth_is_nan(backend, device):
    """The k-th smallest value is a NaN (the reference raised IndexError): thr is NaN, the loss is NaN."""
    for dtype in DTYPES:
        l = torch.tensor([NEG_NAN, 1.0, NAN, 2.0, NAN], dtype=dtype, device=device)
        assert torch.equal(edfkern.cpd_keep_mask(l, 0.7).cpu(), OP["cpd_keep_mask"].baseline(l.cpu(), 0.7))
        s = l.clone().requires_grad_(True)
        loss = edfkern.cpd_trajectory_loss(s, torch.zeros_like(l), torch.ones_like(l), drop_ratio=0.7)
        assert loss.isnan()


# ----------------------------------------------------------------------------- class 1: Grad-CAM


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", OP["grad_cam"].special["hw"], ids=str)
@pytest.mark.parametrize("case", OP["grad_cam"].special["cases"], ids=lambda c: "-".join(map(str, c)))
def test_nan_inf_like_loop_grad_cam(backend, device, dtype, case, hw):
    method, normalize, size, where, kind = case
    gen = torch.Generator().manual_seed(len(method) + (size is None))
    (h, w), N, C, S = hw, 3, 4, 3
    shape = (S, N, C, h, w) if method == "smoothgradcam++" else (N, C, h, w)
    A = rand(*shape, dtype=dtype, gen=gen).abs()
    G = rand(*shape, dtype=dtype, gen=gen)
    if where == "A":
        A = sprinkle(A, SPECIALS[kind], gen, 0.01)
    else:
        G = sprinkle(G, SPECIALS[kind], gen, 0.01)
    clean = A[0].clone() if method == "smoothgradcam++" else None
    sz = (h, w) if size == "same" else size
    loop = OP["grad_cam"].baseline(A, G, method=method, size=sz, normalize=normalize, clean_activations=clean)
    got = edfkern.grad_cam(A.to(device), G.to(device), method=method, size=sz, normalize=normalize,
                           clean_activations=None if clean is None else clean.to(device))
    assert_same_special(got, loop, fp32_loop(dtype), "cam")


# ----------------------------------------------------------------------------- class 1: DAE


DAE_SPECIAL = OP["dae_mask"].special
DAE_SHAPES = DAE_SPECIAL["shapes"]  # (h, w, H, W)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", DAE_SPECIAL["thresholds"].values(), ids=DAE_SPECIAL["thresholds"].keys())
@pytest.mark.parametrize("kind", DAE_SPECIAL["kinds"])
def test_nan_inf_like_loop_dae_mask(backend, device, dtype, threshold, kind):
    """NaN / inf in the CAM: the mask the loop gives (a NaN mean keeps nothing, a +inf mean only the +inf pixels)."""
    gen = torch.Generator().manual_seed(len(kind))
    for h, w, H, W in DAE_SHAPES:
        cam = torch.rand(3, h, w, dtype=torch.float64, generator=gen).to(dtype)
        cam[:2] = sprinkle(cam[:2], SPECIALS[kind], gen, 0.2)  # image 2 stays finite
        loop = OP["dae_mask"].baseline(cam, (H, W), 1.0, threshold).to(dtype)
        got = edfkern.dae_mask(cam.to(device), beta=1.0, threshold=threshold, size=(H, W))
        assert_same_special(got, loop, fp32_loop(dtype), f"mask {(h, w, H, W)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", OP["dae_"].special["wheres"])
@pytest.mark.parametrize("kind", OP["dae_"].special["kinds"])
def test_nan_inf_like_loop_dae_inplace(backend, device, dtype, where, kind):
    """dae_ and dae_sgd_step_ with NaN / inf in the CAM, the gradient, the parameter or the momentum buffer."""
    gen = torch.Generator().manual_seed(len(where) * 7 + len(kind))
    for h, w, H, W in DAE_SHAPES[:4]:
        N, C = 3, 2
        cam = torch.rand(N, h, w, dtype=torch.float64, generator=gen).to(dtype)
        g, p, buf = (rand(N, C, H, W, dtype=dtype, gen=gen) for _ in range(3))
        if where == "cam":
            cam = sprinkle(cam, SPECIALS[kind], gen, 0.2)
        else:
            v = {"grad": g, "param": p, "buf": buf}[where]
            v.copy_(sprinkle(v, SPECIALS[kind], gen, 0.1))
        for threshold in (None, 0.4):
            loop_g = OP["dae_"].baseline(g.clone(), cam, beta=1.0, threshold=threshold)
            got_g = edfkern.dae_(g.clone().to(device), cam.to(device), beta=1.0, threshold=threshold)
            assert_same_special(got_g, loop_g, fp32_loop(dtype), "dae_ grad")
            opts = dict(lr=0.1, beta=1.0, threshold=threshold, momentum=0.9, weight_decay=0.01)
            p_l, b_l = p.clone(), buf.clone()
            OP["dae_sgd_step_"].baseline(p_l, g, b_l, cam, **opts)
            p_a, b_a = p.to(device), buf.to(device)
            edfkern.dae_sgd_step_(p_a, g.to(device), b_a, cam.to(device), **opts)
            assert_same_special(p_a, p_l, fp32_loop(dtype), "param")
            assert_same_special(b_a, b_l, fp32_loop(dtype), "buf")


# ----------------------------------------------------------------------------- class 2: flat CAMs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", DAE_SPECIAL["flat_maps"], ids=str)
def test_flat_cam_rule(backend, device, dtype, hw):
    """Mean threshold: mask == c + beta everywhere; fixed threshold: all pixels on the same side, U == c."""
    h, w = hw
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for size in DAE_SPECIAL["flat_sizes"]:
        H, W = (h, w) if size == "same" else size
        for c in DAE_SPECIAL["flat_values"]:
            cam = torch.full((2, h, w), c, dtype=torch.float64).to(dtype)
            cam[1] = -2 * cam[0] + 0.25  # a second flat image of another value in the same batch
            for threshold in (None, "c", 0.05):
                for i in range(2):
                    thr = float(cam[i, 0, 0]) if threshold == "c" else threshold
                    if thr == 0:
                        thr = None  # 0 means "the mean"
                    expected = flat_rule_mask(cam[i, 0, 0], acc, H, W, 1.5, thr)
                    got = edfkern.dae_mask(cam[i:i + 1].to(device), beta=1.5, threshold=thr, size=(H, W)).cpu()
                    assert torch.equal(got, expected.to(dtype)), (
                        f"size {(H, W)} c={c} thr={thr}: {got.flatten().unique().tolist()} vs {expected.flatten()[0]}")
                    # the loop computes in float32 whatever the CAM dtype; it follows the same rule there
                    loop = OP["dae_mask"].baseline(cam[i:i + 1], (H, W), 1.5, thr)
                    assert torch.equal(loop, flat_rule_mask(cam[i, 0, 0], torch.float32, H, W, 1.5, thr))
            # the in-place ops use the same mask: grad * (c + beta) exactly, per image
            g = rand(2, 3, H, W, dtype=dtype, gen=torch.Generator().manual_seed(H * W))
            m = torch.cat([flat_rule_mask(cam[i, 0, 0], acc, H, W, 1.5, None) for i in range(2)])
            got_g = edfkern.dae_(g.clone().to(device), cam.to(device), beta=1.5).cpu()
            assert torch.equal(got_g, (g.to(acc) * m).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flat_cam_rule_backends_agree(device, dtype):
    """Bit for bit: every backend gives the same mask and the same dae_ on flat CAMs, and agrees with the loop."""
    backends = [b for b, i in edfkern.backends().items() if i["available"] and device in i["devices"]]
    gen = torch.Generator().manual_seed(3)
    for h, w, H, W in DAE_SPECIAL["flat_agree"]:
        cam = torch.tensor([0.0, -0.3, 0.1, 2.0], dtype=torch.float64)[:, None, None].expand(4, h, w).to(dtype)
        g = rand(4, 2, H, W, dtype=dtype, gen=gen)
        results = {}
        for be in backends:
            with edfkern.use_backend(be):
                m = edfkern.dae_mask(cam.to(device), beta=1.0, size=(H, W)).cpu()
                results[be] = (m, edfkern.dae_(g.clone().to(device), cam.to(device), beta=1.0).cpu())
        first = backends[0]
        for be in backends[1:]:
            for name, x, y in zip(("mask", "dae_"), results[be], results[first]):
                assert torch.equal(x, y), f"{be} vs {first}: {name} differs on flat CAMs {(h, w, H, W)}"
        if dtype != torch.float64:  # the loop masks in float32
            loop = OP["dae_mask"].baseline(cam, (H, W), 1.0).to(dtype)
            assert torch.equal(results[first][0], loop)


def test_threshold_flips_between_backends_bounded(backend, device):
    """Non-flat maps: backends compute the mean threshold and U with different roundings (separable sums in
    double, a full-resolution reduction, FMAs), so a pixel sitting within rounding of tau may flip; at
    most 1e-5 of the pixels do, against the reference and against the loop."""
    gen = torch.Generator().manual_seed(11)
    cam = torch.rand(4, 14, 14, dtype=torch.float64, generator=gen).float()
    size = (224, 224)
    got = edfkern.dae_mask(cam.to(device), beta=1.0, size=size).cpu()
    others = [("loop", OP["dae_mask"].baseline(cam, size, 1.0))]
    if backend != "reference":  # the reference against itself could not fail
        with edfkern.use_backend("reference"):
            others.append(("reference", edfkern.dae_mask(cam.to(device), beta=1.0, size=size).cpu()))
    for name, other in others:
        flipped = ((got == 1) != (other == 1)).double().mean().item()
        assert flipped <= 1e-5, f"{flipped:.2e} of the pixels flip against the {name}"
        kept = (got != 1) & (other != 1)
        assert torch.allclose(got[kept], other[kept], rtol=1e-6, atol=1e-6)
