"""Adversarial sweep: every backend vs the loop formulation on inputs with NaN / +-inf and on flat CAMs.

Not a test (pytest does not collect it): ``python tests/sweep_special_values.py`` prints, per class and
backend, how many inputs disagree with ``edfkern.baselines`` (special-value positions, signs, or finite
values beyond a loose tolerance) and, for flat CAMs, how many masks are not bit-identical to the rule.
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import edfkern  # noqa: E402
from edfkern import baselines as B  # noqa: E402
from tests._utils import DTYPES, assert_same_special, rand  # noqa: E402
from tests.opinfo import INF, SPECIALS, flat_rule_mask, sprinkle  # noqa: E402

SOME_KINDS = {k: SPECIALS[k] for k in ("negnan", "inf", "mix")}


def same(a: torch.Tensor, e: torch.Tensor) -> bool:
    """NaN where e is NaN, the same infinities, finite values within 2e-2 relative (1e-3 absolute); shapes equal."""
    try:
        assert_same_special(a, e, torch.float32, tol=(2e-2, 1e-3))
    except AssertionError:
        return False
    return True


def count(counts, key: tuple[str, str], agrees: Callable[[], bool]) -> None:
    """One input of class ``key``: counted as disagreeing when ``agrees()`` is false or raises."""
    counts[key][1] += 1
    try:
        ok = agrees()
    except Exception:
        ok = False
    counts[key][0] += not ok


def sweep_cpd(backends, counts):
    gen = torch.Generator().manual_seed(0)
    for dt in DTYPES:
        for P in (5, 300):
            for ratio in (0.25, 0.9):
                for kind, vals in SPECIALS.items():
                    for where in ("student", "target", "start", "all", "s=t=inf"):
                        s, t, s0 = (rand(P, dtype=dt, gen=gen) for _ in range(3))
                        if where == "s=t=inf":
                            m = torch.rand(P, generator=gen) < 0.3
                            s[m] = INF
                            t[m] = INF
                        else:
                            if where in ("student", "all"):
                                s = sprinkle(s, vals, gen, 0.2)
                            if where in ("target", "all"):
                                t = sprinkle(t, vals, gen, 0.2)
                            if where in ("start", "all"):
                                s0 = sprinkle(s0, vals, gen, 0.2)
                        sb = s.clone().requires_grad_(True)
                        eb = B.cpd_trajectory_loss(sb, t, s0, drop_ratio=ratio)
                        eb.backward()
                        l_ref = ((s.double() - t.double()) ** 2).to(dt)
                        keep_e = B.cpd_keep_mask(l_ref, ratio)

                        def loss_and_grad():
                            sa = s.clone().requires_grad_(True)
                            la = edfkern.cpd_trajectory_loss(sa, t, s0, drop_ratio=ratio)
                            la.backward()
                            return same(la, eb) and same(sa.grad, sb.grad)
                        for be in backends:
                            with edfkern.use_backend(be):
                                count(counts, ("cpd loss+grad", be), loss_and_grad)
                                count(counts, ("cpd keep_mask", be),
                                      lambda: torch.equal(edfkern.cpd_keep_mask(l_ref, ratio), keep_e))


def sweep_gradcam(backends, counts):
    gen = torch.Generator().manual_seed(1)
    for dt in DTYPES:
        for method in ("gradcam", "gradcam++", "smoothgradcam++"):
            for normalize in (True, False):
                for size in (None, "same", (9, 11)):
                    for kind, vals in SOME_KINDS.items():
                        for where in ("A", "G"):
                            N, C, h, w, S = 3, 4, 5, 6, 2
                            shp = (S, N, C, h, w) if method == "smoothgradcam++" else (N, C, h, w)
                            A, G = rand(*shp, dtype=dt, gen=gen).abs(), rand(*shp, dtype=dt, gen=gen)
                            if where == "A":
                                A = sprinkle(A, vals, gen, 0.02)
                            else:
                                G = sprinkle(G, vals, gen, 0.02)
                            kw = dict(method=method, size=(h, w) if size == "same" else size, normalize=normalize,
                                      clean_activations=A[0].clone() if method == "smoothgradcam++" else None)
                            e = B.grad_cam(A, G, **kw)
                            for be in backends:
                                with edfkern.use_backend(be):
                                    count(counts, ("grad_cam", be), lambda: same(edfkern.grad_cam(A, G, **kw), e))


def sweep_dae(backends, counts):
    gen = torch.Generator().manual_seed(2)
    for dt in DTYPES:
        for (h, w, H, W) in ((4, 5, 4, 5), (4, 5, 9, 7), (1, 1, 6, 6), (7, 6, 3, 4)):
            for thr in (None, 0.3):
                for kind, vals in SOME_KINDS.items():
                    for where in ("cam", "grad", "param", "buf"):
                        N, C = 3, 2
                        t = {"cam": torch.rand(N, h, w, dtype=torch.float64, generator=gen).to(dt)}
                        t.update((k, rand(N, C, H, W, dtype=dt, gen=gen)) for k in ("grad", "param", "buf"))
                        t[where] = sprinkle(t[where], vals, gen, 0.15 if where == "cam" else 0.1)
                        cam, g, p, buf = t["cam"], t["grad"], t["param"], t["buf"]
                        sgd = dict(lr=0.1, beta=1.0, threshold=thr, momentum=0.9, weight_decay=0.01)
                        m_e = B.create_soft_mask(cam, (H, W), 1.0, thr).to(dt)
                        g_e = B.dae_(g.clone(), cam, beta=1.0, threshold=thr)
                        p_e, b_e = p.clone(), buf.clone()
                        B.dae_sgd_step_(p_e, g, b_e, cam, **sgd)

                        def step():
                            pa, ba = p.clone(), buf.clone()
                            edfkern.dae_sgd_step_(pa, g, ba, cam, **sgd)
                            return same(pa, p_e) and same(ba, b_e)
                        for be in backends:
                            with edfkern.use_backend(be):
                                if where == "cam":
                                    count(counts, ("dae_mask", be), lambda: same(
                                        edfkern.dae_mask(cam, beta=1.0, threshold=thr, size=(H, W)), m_e))
                                count(counts, ("dae_", be),
                                      lambda: same(edfkern.dae_(g.clone(), cam, beta=1.0, threshold=thr), g_e))
                                count(counts, ("dae_sgd_step_", be), step)


def sweep_flat(backends, counts):
    for dt in DTYPES:
        acc = torch.float64 if dt == torch.float64 else torch.float32
        for (h, w) in ((1, 1), (1, 7), (5, 1), (4, 6), (7, 7)):
            for (H, W) in ((h, w), (32, 32), (13, 9), (3, 2)):
                for c in (0.0, -1.5, 0.1, 0.7):
                    for thr in (None, "c"):
                        cam = torch.full((1, h, w), c, dtype=dt)
                        t = None if thr is None else float(cam[0, 0, 0])
                        exp = flat_rule_mask(cam[0, 0, 0], acc, H, W, 1.0, t).to(dt)
                        count(counts, ("flat baseline", "loop"),
                              lambda: torch.equal(B.create_soft_mask(cam, (H, W), 1.0, t).to(dt), exp))
                        for be in backends:
                            with edfkern.use_backend(be):
                                count(counts, ("flat dae_mask", be), lambda: torch.equal(
                                    edfkern.dae_mask(cam, beta=1.0, threshold=t, size=(H, W)), exp))


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
