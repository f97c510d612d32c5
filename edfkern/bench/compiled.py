"""The ``compiled`` provider: the natural vectorised PyTorch formula of each op under ``torch.compile``.

These are the formulas a user who does not install edfkern would write today: whole-tensor
PyTorch, no Python loop over images, classes or samples, no edfkern kernel. The bench
(:mod:`edfkern.bench.cases`) and the pytest-benchmark suites in ``benchmarks/`` run them
through ``torch.compile`` (inductor, default mode, ``dynamic=False``), forward and backward
through autograd, with compilation outside the timed calls; ``tests/test_bench_compiled.py``
checks every formula, eagerly and compiled, against the public op.

Each formula takes the public op's arguments for the layout the bench times: ``groups`` is
an ``int`` K (class-contiguous blocks of equal size, EDF's / IID's / DM's layout), and
DAE's ``threshold`` is the per-image mean (``None`` or ``0``) or a fixed value. They keep
the op's semantics (docs/ops.md): DAE's ``>=`` threshold, CPD's stable-sort tie-break, the
divide-by-``n_k`` covariance, float32 accumulation (float64 for float64 inputs). Special
values (flat CAMs, NaN) follow plain PyTorch, not docs/special-values.md: the bench feeds
random data.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FORMULAS", "dae_", "dae_sgd_step_", "grad_cam", "cpd_trajectory_loss", "local_covariance",
           "covariance_matching_loss", "class_centralization_loss", "mean_matching_loss", "compiled",
           "probe"]


def _acc(x: Tensor) -> Tensor:
    """``x`` in its accumulation dtype: float64 stays, everything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _blocks(x: Tensor, groups: int, name: str) -> Tensor:
    """``(N, ...)`` -> ``(K, N/K, ...)``: the class-contiguous layout with ``groups`` = K classes."""
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{name}: the compiled formulas take an int K (class-contiguous rows), "
                        f"got {type(groups).__name__}")
    n = x.shape[0]
    if groups < 1 or n % groups:
        raise ValueError(f"{name}: N={n} rows must split into K={groups} equal blocks")
    return x.reshape(groups, n // groups, *x.shape[1:])


# ----------------------------------------------------------------------------- DAE


def _dae_mask(cam: Tensor, size: tuple[int, int], beta: float, threshold: Optional[float]) -> Tensor:
    """``(N, h, w)`` CAM -> ``(N, 1, H, W)`` mask: ``U + beta`` where ``U >= tau``, else 1 (float32)."""
    up = F.interpolate(_acc(cam)[:, None], size=size, mode="bilinear", align_corners=False)
    tau = up.mean(dim=(2, 3), keepdim=True) if not threshold else threshold
    return torch.where(up >= tau, up + beta, 1.0)


def dae_(grad: Tensor, cam: Tensor, *, beta: float, threshold: Optional[float] = None) -> Tensor:
    """EDF's DAE: ``grad *= mask`` in place; grad ``(N, C, H, W)``, cam ``(N, h, w)``.

    ``F.interpolate`` (bilinear, align_corners=False) of the CAM to ``(H, W)``, the per-image
    mean as threshold, ``torch.where(U >= tau, U + beta, 1)``, one broadcast multiply.
    """
    mask = _dae_mask(cam, tuple(grad.shape[-2:]), beta, threshold)
    return grad.mul_(mask.to(grad.dtype))


def dae_sgd_step_(param: Tensor, grad: Tensor, momentum_buffer: Tensor, cam: Tensor, *, lr: float, beta: float,
                  threshold: Optional[float] = None, momentum: float = 0.5) -> Tensor:
    """DAE then ``torch.optim.SGD``'s momentum update (no dampening, weight decay or nesterov), in place.

    ``d = grad * mask``; ``buf = momentum * buf + d``; ``param -= lr * buf``. All ``(N, C, H, W)``;
    ``grad`` is not modified. Returns ``param``.
    """
    d = grad * _dae_mask(cam, tuple(grad.shape[-2:]), beta, threshold).to(grad.dtype)
    momentum_buffer.mul_(momentum).add_(d)
    return param.add_(momentum_buffer, alpha=-lr)


# ----------------------------------------------------------------------------- Grad-CAM


def grad_cam(activations: Tensor, gradients: Tensor, *, method: str = "smoothgradcam++",
             clean_activations: Optional[Tensor] = None) -> Tensor:
    """torchcam's SmoothGradCAM++ (the form EDF runs): ``(S, N, C, h, w)`` A and G -> ``(N, h, w)``.

    ``D2, D3`` = means over S of ``G^2, G^3``; ``alpha = D2 / (2 D2 + sum_hw(A_clean D3) + 1e-8)``;
    ``w = sum_hw alpha ReLU(G_last)``; ``cam = ReLU(sum_c w A_last)``; then ``cam -= min``,
    ``cam /= max + 1e-8`` per map.
    """
    if method != "smoothgradcam++" or clean_activations is None:
        raise ValueError("method: the compiled Grad-CAM formula is smoothgradcam++ with clean_activations")
    A, G, A0 = _acc(activations), _acc(gradients), _acc(clean_activations)
    d2, d3 = (G * G).mean(0), (G * G * G).mean(0)
    alpha = d2 / (2 * d2 + (A0 * d3).sum(dim=(-2, -1), keepdim=True) + 1e-8)
    w = (alpha * torch.relu(G[-1])).sum(dim=(-2, -1))
    cam = torch.relu((w[..., None, None] * A[-1]).sum(1))
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-8)


# ----------------------------------------------------------------------------- CPD


def cpd_trajectory_loss(student: Tensor, target: Tensor, start: Tensor, *, drop_ratio: float) -> Tensor:
    """EDF's CPD: ``sum_kept l / sum_kept d`` over flat ``(P,)`` vectors, a scalar.

    ``l = (s - t)^2``, ``d = (s0 - t)^2``; the kept set is ``torch.argsort(l, stable=True)[k:]``
    with ``k = floor(drop_ratio * P)`` (equal ``l``: lower indices dropped first).
    """
    s, t, s0 = _acc(student), _acc(target), _acc(start)
    l = (s - t) ** 2
    d = (s0 - t) ** 2
    k = int(math.floor(drop_ratio * l.numel()))
    kept = torch.argsort(l.detach(), stable=True)[k:]
    return l[kept].sum() / d[kept].sum()


# ----------------------------------------------------------------------------- IID covariance


def local_covariance(x: Tensor, *, groups: int) -> Tensor:
    """IID's per-class covariance of local features: ``(N, C, L)`` -> ``(K, C, C)``.

    ``Sigma_k = (1/n_k) sum_i (X_i - Xbar_k)(X_i - Xbar_k)^T``: class means by reshape, centred
    features, one ``torch.einsum`` Gram matrix per class (a batched matmul over ``n_k * L``).
    """
    xk = _blocks(_acc(x), groups, "groups")                 # (K, n, C, L)
    xc = xk - xk.mean(dim=1, keepdim=True)
    return torch.einsum("knca,knda->kcd", xc, xc) / xk.shape[1]


def covariance_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: int, real_groups: int,
                             weight: float = 0.01) -> Tensor:
    """IID's L_CM: ``weight * sum_k ||Sigma_k(real) - Sigma_k(syn)||_F^2``, a scalar."""
    diff = local_covariance(real, groups=real_groups) - local_covariance(syn, groups=syn_groups)
    return weight * (diff * diff).sum()


# ----------------------------------------------------------------------------- flat features


def class_centralization_loss(feat: Tensor, *, groups: int, weight: float = 0.05) -> Tensor:
    """IID's linear class centralization: ``weight * sum_k sum_{i in k} ||f_i - mu_k||^2``; feat ``(N, D)``."""
    fk = _blocks(_acc(feat), groups, "groups")              # (K, n, D)
    c = fk - fk.mean(dim=1, keepdim=True)
    return weight * (c * c).sum()


def mean_matching_loss(syn: Tensor, real: Tensor, *, syn_groups: int, real_groups: int,
                       weight: float = 1.0) -> Tensor:
    """DM's mean matching: ``weight * sum_k ||mean_real_k - mean_syn_k||^2``; ``(N, D)`` rows each side."""
    diff = (_blocks(_acc(real), real_groups, "real_groups").mean(1)
            - _blocks(_acc(syn), syn_groups, "syn_groups").mean(1))
    return weight * (diff * diff).sum()


#: bench op name -> its formula
FORMULAS: dict[str, Callable[..., Any]] = {
    "dae_": dae_,
    "dae_sgd_step_": dae_sgd_step_,
    "grad_cam": grad_cam,
    "cpd_trajectory_loss": cpd_trajectory_loss,
    "local_covariance": local_covariance,
    "covariance_matching_loss": covariance_matching_loss,
    "class_centralization_loss": class_centralization_loss,
    "mean_matching_loss": mean_matching_loss,
}

_COMPILED: dict[str, Callable[..., Any]] = {}


def compiled(op: str) -> Callable[..., Any]:
    """``torch.compile(FORMULAS[op], dynamic=False)`` (inductor, default mode), one per process.

    ``dynamic=False``: every new shape is a recompile, so a caller warms each shape it times.
    """
    fn = _COMPILED.get(op)
    if fn is None:
        if op not in FORMULAS:
            raise ValueError(f"unknown op {op!r}; expected one of {list(FORMULAS)}")
        fn = _COMPILED[op] = torch.compile(FORMULAS[op], dynamic=False)
    return fn


_PROBE: dict[str, Optional[str]] = {}


def probe(device: str = "cpu") -> Optional[str]:
    """None if ``torch.compile`` (inductor) can compile and run a small function on ``device``,
    else a one-line reason (no C++ compiler, an inductor error, ...). Cached per device type."""
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if dev not in _PROBE:
        try:
            f = torch.compile(lambda x: torch.relu(x) * 2 + 1, dynamic=False)
            x = torch.arange(8.0, device=dev) - 4
            ok = torch.equal(f(x), torch.relu(x) * 2 + 1)
            _PROBE[dev] = None if ok else "torch.compile probe returned wrong values"
        except Exception as e:  # no compiler, inductor or triton missing: skip the provider, never crash
            _PROBE[dev] = one_line(e)
    return _PROBE[dev]


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]
