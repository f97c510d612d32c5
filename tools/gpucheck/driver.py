"""Call every kernel of one backend once at small, odd shapes (the compute-sanitizer workload).

``python -m tools.gpucheck.driver --backend native --device cuda`` runs each public op (and
so each native CUDA kernel: DAE tau/mask/apply/sgd, Grad-CAM weights/map, the CPD radix
passes and backward, covariance gram/backward, seg_mean, CC) in float32, float16, bfloat16
and float64, with int and label groups, forward and backward, and compares each result with
the ``reference`` backend by relative norm (a loose check: the sanitizer's memory and race
reports are the point). Exit code 1 if any comparison fails or any call raises.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

import edfkern

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _cases(device: str, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[str, Callable[[], list[torch.Tensor]]]]:
    """(name, thunk returning the tensors to compare) for every op at small odd shapes."""
    def r(*shape, dt=dtype, pos=False):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (x.abs() + 0.1 if pos else x).to(device=device, dtype=dt)

    N, C, H, W, h, w, K = 7, 3, 13, 11, 5, 3, 3
    cam = r(N, h, w, dt=torch.float32 if dtype != torch.float64 else dtype, pos=True)
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 2], device=device)
    out: list = []

    out.append(("dae_mask", lambda: [edfkern.dae_mask(cam, beta=1.0, size=(H, W)),
                                     edfkern.dae_mask(cam, beta=2.0, threshold=0.4, size=(H, W)),
                                     edfkern.dae_mask(cam, beta=1.0)]))
    g0 = r(N, C, H, W)
    out.append(("dae_", lambda: [edfkern.dae_(g0.clone(), cam, beta=1.0)]))

    def sgd():
        res = []
        for mom, first, nest in ((0.5, True, False), (0.5, False, True), (0.0, False, False)):
            p, g = g0.clone() * 0.5, g0.clone()
            b = g0.clone() * 0.25 if mom else None
            edfkern.dae_sgd_step_(p, g, b, cam, lr=10.0, beta=1.0, momentum=mom, nesterov=nest, first_step=first,
                                  weight_decay=0.01)
            res += [p] + ([b] if b is not None else [])
        return res
    out.append(("dae_sgd_step_", sgd))

    A, G = r(N, 9, h, w, pos=True), r(N, 9, h, w)
    As, Gs = r(3, N, 9, h, w, pos=True), r(3, N, 9, h, w)
    out.append(("grad_cam", lambda: [edfkern.grad_cam(A, G, method="gradcam"),
                                     edfkern.grad_cam(A, G, method="gradcam++", size=(H, W)),
                                     edfkern.grad_cam(As, Gs, method="smoothgradcam++", clean_activations=A,
                                                      size=(H, W))]))

    def cpd():
        s = r(1001).requires_grad_(True)
        t, s0 = r(1001), r(1001)
        loss = edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=0.375)
        (gs,) = torch.autograd.grad(loss, s)
        return [loss, gs, edfkern.cpd_keep_mask((s.detach() - t) ** 2, 0.25).to(dtype)]
    out.append(("cpd", cpd))

    def cov():
        res = []
        for groups in (K, labels):
            x = r(N if not isinstance(groups, int) else 9, 5, 7).requires_grad_(True)
            gg = groups if not isinstance(groups, int) else K
            sig = edfkern.local_covariance(x, groups=gg, num_groups=K)
            (gx,) = torch.autograd.grad((sig * sig).sum(), x)
            res += [sig, gx]
        syn, real = r(9, 5, 7).requires_grad_(True), r(12, 5, 7)
        loss = edfkern.covariance_matching_loss(syn, real, syn_groups=K, real_groups=K)
        (gs,) = torch.autograd.grad(loss, syn)
        return res + [loss, gs]
    out.append(("covariance", cov))

    def feats():
        res = []
        for groups in (K, labels):
            n = 9 if isinstance(groups, int) else N
            f = r(n, 37).requires_grad_(True)
            loss = edfkern.class_centralization_loss(f, groups=groups, num_groups=K)
            (gf,) = torch.autograd.grad(loss, f)
            res += [loss, gf]
        syn, real = r(9, 37).requires_grad_(True), r(6, 37)
        loss = edfkern.mean_matching_loss(syn, real, syn_groups=K, real_groups=K)
        (gs,) = torch.autograd.grad(loss, syn)
        return res + [loss, gs]
    out.append(("features", feats))
    return out


def run(backend: str, device: str, dtypes=DTYPES, log=print) -> int:
    """Run every case under ``backend`` and compare with ``reference``; returns the number of failures."""
    fails = 0
    for dtype in dtypes:
        names = [n for n, _ in _cases(device, dtype, torch.Generator().manual_seed(0))]
        for i, name in enumerate(names):
            label = f"{name} {str(dtype)[6:]}"

            def call(b: str) -> list[torch.Tensor]:  # fresh inputs (same seed) for each backend
                thunk = _cases(device, dtype, torch.Generator().manual_seed(0))[i][1]
                with edfkern.use_backend(b):
                    res = [t.detach() for t in thunk()]
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return res
            try:
                got = call(backend)
                want = call("reference")
            except Exception as e:  # noqa: BLE001 - report and go on: the sanitizer wants every kernel
                log(f"FAIL {label}: {type(e).__name__}: {e}")
                fails += 1
                continue
            worst = 0.0
            for a, b in zip(got, want):
                a, b = a.double().cpu(), b.double().cpu()
                if a.isnan().any() != b.isnan().any():
                    worst = float("inf")
                    break
                worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
            ok = worst <= _TOL[dtype]
            fails += not ok
            log(f"{'ok  ' if ok else 'FAIL'} {label}: max rel-norm diff vs reference {worst:.2e}")
    return fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpucheck.driver", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="native")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,float64")
    args = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    fails = run(args.backend, args.device, dtypes)
    print(f"driver: {fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
