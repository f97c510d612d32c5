"""Adversarial sweep: every backend vs the loop formulation on inputs with NaN / +-inf and on flat CAMs.

Not a test (pytest does not collect it): ``python tests/sweep_special_values.py`` prints, per class and
backend, how many inputs disagree with ``edfkern.baselines`` (special-value positions, signs, or finite
values beyond a loose tolerance) and, for flat CAMs, how many masks are not bit-identical to the rule.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import collections  # noqa: E402

import torch  # noqa: E402

import edfkern  # noqa: E402
from edfkern import baselines as B  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")
NEG_NAN = -float("nan")  # sign bit set, like x86's default NaN from 0*inf


def same(a: torch.Tensor, e: torch.Tensor, rtol: float = 2e-2, atol: float = 1e-3) -> bool:
    """NaN where e is NaN, the same infinities, finite values close; shapes equal."""
    if a.shape != e.shape:
        return False
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    if not torch.equal(a.isnan(), e.isnan()):
        return False
    ia, ie = a.isinf(), e.isinf()
    if not torch.equal(ia, ie) or not torch.equal(a[ia], e[ie]):
        return False
    f = ~(a.isnan() | ia)
    return bool(((a[f] - e[f]).abs() <= atol + rtol * e[f].abs()).all())


def sprinkle(x: torch.Tensor, kinds, gen: torch.Generator, frac: float = 0.2) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    n = max(1, int(frac * flat.numel()))
    idx = torch.randperm(flat.numel(), generator=gen)[:n]
    vals = torch.tensor(kinds, dtype=torch.float64)[torch.randint(len(kinds), (n,), generator=gen)]
    flat[idx] = vals.to(x.dtype)
    return x


KINDS = {"nan": [NAN], "negnan": [NEG_NAN], "inf": [INF], "-inf": [-INF], "mix": [NAN, NEG_NAN, INF, -INF]}
SOME_KINDS = {k: KINDS[k] for k in ("negnan", "inf", "mix")}


def sweep_cpd(backends, counts):
    gen = torch.Generator().manual_seed(0)
    for dt in DTYPES:
        for P in (5, 300):
            for ratio in (0.25, 0.9):
                for kind, vals in KINDS.items():
                    for where in ("student", "target", "start", "all", "s=t=inf"):
                        s, t, s0 = (torch.randn(P, dtype=torch.float64, generator=gen).to(dt) for _ in range(3))
                        if where == "s=t=inf":
                            m = torch.rand(P, generator=gen) < 0.3
                            s[m] = INF
                            t[m] = INF
                        else:
                            if where in ("student", "all"):
                                s = sprinkle(s, vals, gen)
                            if where in ("target", "all"):
                                t = sprinkle(t, vals, gen)
                            if where in ("start", "all"):
                                s0 = sprinkle(s0, vals, gen)
                        sb = s.clone().requires_grad_(True)
                        eb = B.cpd_trajectory_loss(sb, t, s0, drop_ratio=ratio)
                        eb.backward()
                        l_ref = ((s.double() - t.double()) ** 2).to(dt)
                        keep_e = B.cpd_keep_mask(l_ref, ratio)
                        for be in backends:
                            with edfkern.use_backend(be):
                                key = ("cpd loss+grad", be)
                                counts[key][1] += 1
                                try:
                                    sa = s.clone().requires_grad_(True)
                                    la = edfkern.cpd_trajectory_loss(sa, t, s0, drop_ratio=ratio)
                                    la.backward()
                                    ok = same(la, eb) and same(sa.grad, sb.grad)
                                except Exception:
                                    ok = False
                                counts[key][0] += not ok
                                key = ("cpd keep_mask", be)
                                counts[key][1] += 1
                                try:
                                    ok = torch.equal(edfkern.cpd_keep_mask(l_ref, ratio), keep_e)
                                except Exception:
                                    ok = False
                                counts[key][0] += not ok


def sweep_gradcam(backends, counts):
    gen = torch.Generator().manual_seed(1)
    for dt in DTYPES:
        for method in ("gradcam", "gradcam++", "smoothgradcam++"):  # noqa: E501
            for normalize in (True, False):
                for size in (None, "same", (9, 11)):
                    for kind, vals in SOME_KINDS.items():
                        for where in ("A", "G"):
                            N, C, h, w, S = 3, 4, 5, 6, 2
                            shp = (S, N, C, h, w) if method == "smoothgradcam++" else (N, C, h, w)
                            A = torch.randn(shp, dtype=torch.float64, generator=gen).abs().to(dt)
                            G = torch.randn(shp, dtype=torch.float64, generator=gen).to(dt)
                            if where in ("A", "both"):
                                A = sprinkle(A, vals, gen, 0.02)
                            if where in ("G", "both"):
                                G = sprinkle(G, vals, gen, 0.02)
                            Ac = A[0].clone() if method == "smoothgradcam++" else None
                            sz = (h, w) if size == "same" else size
                            e = B.grad_cam(A, G, method=method, size=sz, normalize=normalize, clean_activations=Ac)
                            for be in backends:
                                with edfkern.use_backend(be):
                                    key = ("grad_cam", be)
                                    counts[key][1] += 1
                                    try:
                                        a = edfkern.grad_cam(A, G, method=method, size=sz, normalize=normalize,
                                                             clean_activations=Ac)
                                        ok = same(a, e)
                                    except Exception:
                                        ok = False
                                    counts[key][0] += not ok


def sweep_dae(backends, counts):
    gen = torch.Generator().manual_seed(2)
    for dt in DTYPES:
        for (h, w, H, W) in ((4, 5, 4, 5), (4, 5, 9, 7), (1, 1, 6, 6), (7, 6, 3, 4)):
            for thr in (None, 0.3):
                for kind, vals in SOME_KINDS.items():
                    for where in ("cam", "grad", "param", "buf"):
                        N, C = 3, 2
                        cam = torch.rand(N, h, w, dtype=torch.float64, generator=gen).to(dt)
                        g = torch.randn(N, C, H, W, dtype=torch.float64, generator=gen).to(dt)
                        p = torch.randn(N, C, H, W, dtype=torch.float64, generator=gen).to(dt)
                        buf = torch.randn(N, C, H, W, dtype=torch.float64, generator=gen).to(dt)
                        if where == "cam":
                            cam = sprinkle(cam, vals, gen, 0.15)
                        elif where == "grad":
                            g = sprinkle(g, vals, gen, 0.1)
                        elif where == "param":
                            p = sprinkle(p, vals, gen, 0.1)
                        else:
                            buf = sprinkle(buf, vals, gen, 0.1)
                        m_e = B.create_soft_mask(cam, (H, W), 1.0, thr).to(dt)
                        g_e = B.dae_(g.clone(), cam, beta=1.0, threshold=thr)
                        p_e, b_e = p.clone(), buf.clone()
                        B.dae_sgd_step_(p_e, g, b_e, cam, lr=0.1, beta=1.0, threshold=thr, momentum=0.9,
                                        weight_decay=0.01)
                        for be in backends:
                            with edfkern.use_backend(be):
                                for name, fn, exp in (
                                    ("dae_mask", lambda: edfkern.dae_mask(cam, beta=1.0, threshold=thr, size=(H, W)),
                                     m_e),
                                    ("dae_", lambda: edfkern.dae_(g.clone(), cam, beta=1.0, threshold=thr), g_e),
                                ):
                                    if name == "dae_mask" and where != "cam":
                                        continue
                                    key = (name, be)
                                    counts[key][1] += 1
                                    try:
                                        ok = same(fn(), exp)
                                    except Exception:
                                        ok = False
                                    counts[key][0] += not ok
                                key = ("dae_sgd_step_", be)
                                counts[key][1] += 1
                                try:
                                    pa, ba = p.clone(), buf.clone()
                                    edfkern.dae_sgd_step_(pa, g, ba, cam, lr=0.1, beta=1.0, threshold=thr, momentum=0.9,
                                                          weight_decay=0.01)
                                    ok = same(pa, p_e) and same(ba, b_e)
                                except Exception:
                                    ok = False
                                counts[key][0] += not ok


def flat_rule_mask(c: float, dt: torch.dtype, H: int, W: int, beta: float, thr) -> torch.Tensor:
    """The flat-CAM rule: U(cam) == c exactly, tau == c (mean) -> mask c + beta everywhere (in acc, then dt)."""
    acc = torch.float64 if dt == torch.float64 else torch.float32
    cv = torch.tensor(c, dtype=torch.float64).to(dt).to(acc)
    t = cv if thr is None else torch.tensor(thr, dtype=torch.float64).to(acc)
    val = cv + torch.tensor(beta, dtype=torch.float64).to(acc) if cv >= t else torch.ones((), dtype=acc)
    return val.expand(1, 1, H, W).to(dt)


def sweep_flat(backends, counts):
    for dt in DTYPES:
        for (h, w) in ((1, 1), (1, 7), (5, 1), (4, 6), (7, 7)):
            for (H, W) in ((h, w), (32, 32), (13, 9), (3, 2)):
                for c in (0.0, -1.5, 0.1, 0.7):
                    for thr in (None, "c"):
                        cam = torch.full((1, h, w), c, dtype=dt)
                        t = None if thr is None else float(cam[0, 0, 0])
                        exp = flat_rule_mask(c, dt, H, W, 1.0, t)
                        key = ("flat baseline", "loop")
                        counts[key][1] += 1
                        counts[key][0] += not torch.equal(B.create_soft_mask(cam, (H, W), 1.0, t).to(dt), exp)
                        for be in backends:
                            with edfkern.use_backend(be):
                                key = ("flat dae_mask", be)
                                counts[key][1] += 1
                                try:
                                    ok = torch.equal(edfkern.dae_mask(cam, beta=1.0, threshold=t, size=(H, W)), exp)
                                except Exception:
                                    ok = False
                                counts[key][0] += not ok


def main() -> None:
    backends = [b for b, i in edfkern.backends().items() if i["available"] and "cpu" in i["devices"]]
    counts: dict = collections.defaultdict(lambda: [0, 0])
    for fn in (sweep_cpd, sweep_gradcam, sweep_dae, sweep_flat):
        fn(backends, counts)
    print(f"{'class':<18} {'backend':<10} {'disagree':>8} / {'inputs':<6}")
    for (cls, be), (bad, n) in sorted(counts.items()):
        print(f"{cls:<18} {be:<10} {bad:>8} / {n:<6}")


if __name__ == "__main__":
    main()
