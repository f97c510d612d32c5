"""One setup factory per op, keyed by provider and mode: the setup is built once, outside the timed call.

``make_case(op, provider, mode, config)`` builds fresh random inputs for a named
docs/benchmarks.md config and returns a :class:`Case`: a timed callable that
synchronises the device itself, an untimed ``reset`` to run before every timed
call, and the op's cost model (the bytes it must move and the FLOPs it must do).
The CLI (``python -m edfkern.bench``) and the pytest-benchmark suites in
``benchmarks/`` both build their cases here, so they time the same thing.

Providers
    ``baseline``: the loop formulations in :mod:`edfkern.baselines` (imported, never copied);
    any backend name of :func:`edfkern.backends` (``reference``, ``triton``, ``native``):
    the public op under ``edfkern.use_backend(name)``; ``compiled``: ``torch.compile`` of the
    natural vectorised PyTorch formula in :mod:`edfkern.bench.compiled` (no edfkern kernel).
    A ``compiled`` case is warmed at its own shape inside :func:`make_case` (``dynamic=False``:
    every shape compiles once), so no compilation falls in a timed call; ``Case.compile_s``
    holds the first calls' extra time, and a recompile during timing is an error.

Modes
    ``fwd``: the forward call (inputs that need a gradient do, as in training, so the
    graph is built); ``bwd``: ``backward()`` of a forward run once in setup
    (``retain_graph=True``); ``full``: forward then backward. DAE and Grad-CAM have no
    autograd: their only mode is ``fwd`` (one whole call).

Cost model (bytes and FLOPs written before optimising): the floor of each op
    ``s`` = bytes per element (4 for fp32). The byte counts are the tensors the op
    must read and write at least once; the FLOP counts are the multiply-adds that no
    formulation avoids (2 per MAC). ``floor time = max(bytes / copy BW, FLOPs / matmul rate)``
    with the device ceilings of :mod:`edfkern.bench.ceilings`.

    ===========================  =========================================  ==========================
    op / mode                    bytes                                       FLOPs
    ===========================  =========================================  ==========================
    dae_                         2 N C H W s  (read+write grad)              N C H W (+ N H W mask)
    dae_sgd_step_                5 N C H W s  (read grad,param,buf;          ~6 N C H W
                                 write param,buf)
    grad_cam (smoothgradcam++)   (S+2) N C h w s (all G, A_last, A_clean)    ~(3S+8) N C h w
    cpd fwd / bwd / full         3 P s / 3 P s / 6 P s                       ~6 P / ~4 P / ~10 P
    local_covariance fwd         N C L s + K C (C+L) 4                       2 N C^2 L
    local_covariance bwd         2 N C L s + K C^2 4                         2 N C^2 L
    covariance_matching fwd      (Ns+Nr) C L s                               2 (Ns+Nr) C^2 L
    covariance_matching bwd      2 Ns C L s  (syn grad only; IID            2 Ns C^2 L
                                 detaches real)
    class_centralization fwd     N D s                                       3 N D
    class_centralization bwd     2 N D s                                     2 N D
    mean_matching fwd / bwd      (Ns+Nr) D s / Ns D s                        (Ns+Nr) D / Ns D
    ===========================  =========================================  ==========================

    ``full`` is fwd + bwd. Every covariance op sits near the ridge point of a CPU
    (C = 128, L = 16: 2 C^2 L / (C L s) = 64 FLOP/byte), so it is compute-bound there;
    everything else is bandwidth-bound.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

import edfkern
from edfkern import baselines
from edfkern._dispatch import auto_backend
from edfkern.reference import OP_KERNELS

from . import compiled as _compiled
from .configs import Config, get_config

__all__ = ["Case", "Unavailable", "OPS", "MODES", "make_case", "op_modes", "main_mode", "skip_reason",
           "providers", "default_provider", "KERNEL_OF", "input_bytes", "fit_scale", "SCALES"]

MODES = ("fwd", "bwd", "full")


class Unavailable(Exception):
    """The provider cannot run here, or the config has no input for this op; ``str(e)`` says why."""


@dataclass
class Case:
    """One op x provider x mode x config, ready to time.

    ``fn()`` runs the op once and synchronises the device; it returns the outputs the
    op must hand back (kept alive for the memory accounting). ``reset()`` (untimed)
    restores in-place inputs and drops the previous call's ``.grad``.
    """

    op: str
    provider: str
    mode: str
    config: Config
    device: str
    fn: Callable[[], Any]
    reset: Callable[[], None]
    bytes_moved: int
    flops: int
    shapes: str
    leaves: list[Tensor] = field(default_factory=list)   # inputs whose .grad the op must produce
    inplace: list[Tensor] = field(default_factory=list)  # outputs that live in the inputs (held, not new)
    compile_s: Optional[float] = None  # compiled provider: first calls' time above a warm call (compilation)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.provider}-{self.mode}-{self.config.name}]"

    def held_bytes(self, out: Any) -> int:
        """Bytes of the outputs and gradients the op must hold anyway (not workspace)."""
        seen: set[int] = set()
        total = 0

        def add(t):
            nonlocal total
            if isinstance(t, Tensor) and t.data_ptr() not in seen and not any(t is x for x in self.inplace):
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
            elif isinstance(t, (tuple, list)):
                for x in t:
                    add(x)

        add(out)
        for leaf in self.leaves:
            if leaf.grad is not None:
                add(leaf.grad)
        return total


# ----------------------------------------------------------------------------- providers


def providers(device: str, *, probe_compiled: bool = True) -> dict[str, Optional[str]]:
    """``baseline``, every backend in :func:`edfkern.backends` and ``compiled``, mapped to ``None``
    (can run on ``device``) or the reason it cannot. ``probe_compiled=False`` skips the
    ``torch.compile`` probe (a few seconds the first time) and reports ``compiled`` as not probed."""
    out: dict[str, Optional[str]] = {"baseline": None}
    for name, info in edfkern.backends().items():
        if not info["available"]:
            out[name] = str(info["reason"])
        elif device not in info["devices"]:
            out[name] = f"cannot take {device} tensors"
        else:
            out[name] = None
    if probe_compiled:
        why = _compiled.probe(device)
        out["compiled"] = None if why is None else f"torch.compile cannot run here: {why}"
    else:
        out["compiled"] = "not probed"
    return out


def default_provider(op: str, device: str) -> Optional[str]:
    """The backend ``auto`` picks for ``op`` on ``device`` tensors: :func:`edfkern._dispatch.auto_backend`
    of the op's kernel (:data:`KERNEL_OF`), so a per-op ``AUTO_CUDA`` entry is honoured; None if none can."""
    return auto_backend(KERNEL_OF[_check_op(op)], device)


def _impl(provider: str, fn_name: str) -> tuple[Callable, Callable[[], Any]]:
    """(function, context factory) for a provider: the loop baseline, or the public op under a backend."""
    if provider == "baseline":
        return getattr(baselines, fn_name), contextlib.nullcontext
    if provider == "compiled":
        return _compiled.compiled(fn_name), contextlib.nullcontext
    info = edfkern.backends().get(provider)
    if info is None:
        raise Unavailable(f"unknown provider {provider!r}; known: baseline, {', '.join(edfkern.backends())}, "
                          "compiled")
    if not info["available"]:
        raise Unavailable(f"{provider}: {info['reason']}")
    return getattr(edfkern, fn_name), lambda: edfkern.use_backend(provider)


def _sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


# ----------------------------------------------------------------------------- op table

#: op name -> (modes it has, what the config must provide, skip reason when it does not)
_OPS: dict[str, tuple[tuple[str, ...], Callable[[Config], bool], str]] = {
    "dae_": (("fwd",), lambda c: True, ""),
    "dae_sgd_step_": (("fwd",), lambda c: True, ""),
    "grad_cam": (("fwd",), lambda c: True, ""),
    "cpd_trajectory_loss": (MODES, lambda c: c.cpd_P is not None, "config has no CPD expert (no P in docs/benchmarks.md)"),
    "local_covariance": (MODES, lambda c: c.local is not None, "config has no IID local features"),
    "covariance_matching_loss": (MODES, lambda c: c.local is not None, "config has no IID local features"),
    "class_centralization_loss": (MODES, lambda c: c.cc_dim is not None, "config has no CC features"),
    "mean_matching_loss": (MODES, lambda c: c.local is not None, "config has no DM features"),
}
OPS = tuple(_OPS)

#: bench op -> the kernel its public op asks :func:`edfkern._dispatch.kernel` for first (its forward kernel)
KERNEL_OF: dict[str, str] = {op: OP_KERNELS[op][0] for op in OPS}


def op_modes(op: str) -> tuple[str, ...]:
    return _OPS[_check_op(op)][0]


def main_mode(op: str) -> str:
    """``full`` where the op has a backward, else ``fwd``: the mode a training step runs."""
    return "full" if "full" in op_modes(op) else "fwd"


def skip_reason(op: str, config: Config) -> Optional[str]:
    """Why ``config`` has no input for ``op``, or None."""
    _, has, why = _OPS[_check_op(op)]
    return None if has(config) else why


def _check_op(op: str) -> str:
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {list(_OPS)}")
    return op


# ----------------------------------------------------------------------------- the factory


def make_case(op: str, provider: str, mode: str, config: Config | str, *, device: str = "cpu",
              scale: float = 1.0, ipc: Optional[int] = None, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> Case:
    """Build one case with fresh random inputs (``seed``: the same data for every provider).

    Raises :class:`Unavailable` if the provider cannot run or the config lacks the op's input.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    if ipc is not None:
        cfg = cfg.with_ipc(ipc)
    cfg = cfg.scaled(scale)
    modes = op_modes(op)
    if mode not in modes:
        raise Unavailable(f"{op} has no {mode!r} mode (modes: {', '.join(modes)})")
    why = skip_reason(op, cfg)
    if why:
        raise Unavailable(why)
    gen = torch.Generator(device=device).manual_seed(seed)
    if provider != "compiled":
        return _SETUPS[op](provider, mode, cfg, device, dtype, gen)
    try:  # compiles at this shape (in bwd mode the setup's forward already does), then warms
        t0 = time.perf_counter()
        case = _SETUPS[op](provider, mode, cfg, device, dtype, gen)
        case.compile_s = _warm_compiled(case, time.perf_counter() - t0)
    except Unavailable:
        raise
    except Exception as e:  # an inductor error, no C++ compiler: skip this case with a one-line reason
        raise Unavailable(f"torch.compile failed: {_compiled.one_line(e)}") from None
    return case


def _warm_compiled(case: Case, setup_s: float) -> float:
    """Call a compiled case until it is warm; return the compile time (first calls above a warm call).

    Two calls compile the forward (first) and, for autograd modes, the lazily compiled backward;
    a third, warm call sets the bar. ``setup_s`` (the setup, which in bwd mode ran the compiled
    forward once) counts as compilation too in bwd mode, less nothing: it over-states the
    compile time by the input generation it also holds. Afterwards ``case.fn`` runs under
    ``torch.compiler.set_stance("fail_on_recompile")``: a recompile in a timed call is an error.
    """
    sync = _sync(case.device)
    spent = []
    for _ in range(3):
        case.reset()
        sync()
        t0 = time.perf_counter()
        out = case.fn()
        spent.append(time.perf_counter() - t0)
        del out
    warm = spent[-1]
    case.fn = _no_recompile(case.fn)
    case.reset()
    case.fn()  # under the stance: proves the timed calls will not compile
    case.reset()
    return max(0.0, spent[0] + spent[1] - 2 * warm + (setup_s if case.mode == "bwd" else 0.0))


def _no_recompile(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with torch.compiler.set_stance("fail_on_recompile"):
            return fn()
    return run


def _randn(shape, gen, device, dtype, *, grad=False) -> Tensor:
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return t.requires_grad_(grad)


def _rand(shape, gen, device, dtype) -> Tensor:
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _autograd_case(op, provider, mode, cfg, device, forward: Callable[[], Tensor], leaves: list[Tensor],
                   ctx: Callable, costs: dict[str, tuple[int, int]], shapes: str,
                   grad_output: Optional[Tensor] = None) -> Case:
    """fwd / bwd / full cases of a differentiable op from its forward closure."""
    sync = _sync(device)

    def drop_grads():
        for t in leaves:
            t.grad = None

    def fwd():
        with ctx():
            out = forward()
        sync()
        return out

    def full():
        with ctx():
            out = forward()
            out.backward(grad_output)
        sync()
        return out

    if mode == "fwd":
        fn = fwd
    elif mode == "full":
        fn = full
    else:  # bwd: one forward in setup; time backward of the retained graph
        with ctx():
            out0 = forward()
        sync()

        def fn():
            with ctx():
                out0.backward(grad_output, retain_graph=True)
            sync()
            return None

    b, f = costs[mode] if mode in costs else tuple(map(sum, zip(costs["fwd"], costs["bwd"])))
    return Case(op, provider, mode, cfg, device, fn, drop_grads, b, f, shapes, leaves=leaves)


# --- DAE ---------------------------------------------------------------------


def _dae_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "dae_")
    c, H, W = cfg.image
    _, h, w = cfg.cam
    grad = _randn((cfg.N, c, H, W), gen, device, dtype)
    pristine = grad.clone()  # dae_ rescales grad in place: reset() restores it, untimed
    cam = _rand((cfg.N, h, w), gen, device, torch.float32)
    sync = _sync(device)

    def fn():
        with ctx():
            f(grad, cam, beta=cfg.beta)
        sync()
        return grad

    s = grad.element_size()
    e = grad.numel()
    return Case("dae_", provider, mode, cfg, device, fn, lambda: grad.copy_(pristine),
                bytes_moved=2 * e * s + cam.numel() * 4, flops=e + 10 * cfg.N * H * W,
                shapes=f"grad {tuple(grad.shape)}, cam {tuple(cam.shape)}, beta {cfg.beta}", inplace=[grad])


def _dae_sgd_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "dae_sgd_step_")
    c, H, W = cfg.image
    _, h, w = cfg.cam
    shape = (cfg.N, c, H, W)
    param, grad, buf = (_randn(shape, gen, device, dtype) for _ in range(3))
    cam = _rand((cfg.N, h, w), gen, device, torch.float32)
    sync = _sync(device)

    def fn():  # EDF: lr_img 100-1000, momentum 0.5; values stay finite over any number of steps
        with ctx():
            f(param, grad, buf, cam, lr=100.0, beta=cfg.beta, momentum=0.5)
        sync()
        return param

    e, s = param.numel(), param.element_size()
    return Case("dae_sgd_step_", provider, mode, cfg, device, fn, lambda: None,
                bytes_moved=5 * e * s + cam.numel() * 4, flops=6 * e + 10 * cfg.N * H * W,
                shapes=f"param/grad/buf {shape}, cam {tuple(cam.shape)}, lr 100, momentum 0.5",
                inplace=[param, buf])


# --- Grad-CAM ----------------------------------------------------------------


def _grad_cam_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "grad_cam")
    C, h, w = cfg.cam
    S = cfg.cam_samples
    acts = _rand((S, cfg.N, C, h, w), gen, device, dtype)   # post-ReLU layer4 activations are >= 0
    grads = _randn((S, cfg.N, C, h, w), gen, device, dtype)
    clean = _rand((cfg.N, C, h, w), gen, device, dtype)
    sync = _sync(device)

    def fn():
        with ctx():
            out = f(acts, grads, method="smoothgradcam++", clean_activations=clean)
        sync()
        return out

    per = cfg.N * C * h * w
    return Case("grad_cam", provider, mode, cfg, device, fn, lambda: None,
                bytes_moved=(S + 2) * per * acts.element_size() + cfg.N * h * w * 4, flops=(3 * S + 8) * per,
                shapes=f"smoothgradcam++ A,G {tuple(acts.shape)}, A_clean {tuple(clean.shape)}")


# --- CPD ---------------------------------------------------------------------


def _cpd_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "cpd_trajectory_loss")
    P = cfg.cpd_P
    student = _randn((P,), gen, device, dtype, grad=True)
    target = _randn((P,), gen, device, dtype)
    start = _randn((P,), gen, device, dtype)
    s = student.element_size()
    costs = {"fwd": (3 * P * s, 6 * P), "bwd": (3 * P * s, 4 * P)}
    return _autograd_case("cpd_trajectory_loss", provider, mode, cfg, device,
                          lambda: f(student, target, start, drop_ratio=cfg.drop_ratio), [student], ctx, costs,
                          f"P={P}, drop_ratio {cfg.drop_ratio}")


# --- IID covariance ----------------------------------------------------------


def _local_cov_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "local_covariance")
    C, L = cfg.local
    x = _randn((cfg.N, C, L), gen, device, dtype, grad=True)
    g_out = _randn((cfg.K, C, C), gen, device, torch.float32)  # one shared grad_output for backward
    s = x.element_size()
    e = x.numel()
    costs = {"fwd": (e * s + cfg.K * C * (C + L) * 4, 2 * cfg.N * C * C * L),
             "bwd": (2 * e * s + cfg.K * C * C * 4, 2 * cfg.N * C * C * L)}
    return _autograd_case("local_covariance", provider, mode, cfg, device, lambda: f(x, groups=cfg.K), [x], ctx,
                          costs, f"x {tuple(x.shape)}, K={cfg.K}", grad_output=g_out)


def _cm_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "covariance_matching_loss")
    C, L = cfg.local
    syn = _randn((cfg.N, C, L), gen, device, dtype, grad=True)
    real = _randn((cfg.N_real, C, L), gen, device, dtype)  # IID detaches the real features
    s = syn.element_size()
    ns, nr = cfg.N, cfg.N_real
    costs = {"fwd": ((ns + nr) * C * L * s, 2 * (ns + nr) * C * C * L), "bwd": (2 * ns * C * L * s, 2 * ns * C * C * L)}
    return _autograd_case("covariance_matching_loss", provider, mode, cfg, device,
                          lambda: f(syn, real, syn_groups=cfg.K, real_groups=cfg.K, weight=0.01), [syn], ctx,
                          costs, f"syn {tuple(syn.shape)}, real {tuple(real.shape)}, K={cfg.K}")


# --- IID / DM flat features --------------------------------------------------


def _cc_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "class_centralization_loss")
    D = cfg.cc_dim
    feat = _randn((cfg.N, D), gen, device, dtype, grad=True)
    s = feat.element_size()
    costs = {"fwd": (cfg.N * D * s, 3 * cfg.N * D), "bwd": (2 * cfg.N * D * s, 2 * cfg.N * D)}
    return _autograd_case("class_centralization_loss", provider, mode, cfg, device,
                          lambda: f(feat, groups=cfg.K, weight=0.05), [feat], ctx, costs,
                          f"feat {tuple(feat.shape)}, K={cfg.K}")


def _mm_case(provider, mode, cfg, device, dtype, gen) -> Case:
    f, ctx = _impl(provider, "mean_matching_loss")
    D = cfg.local[0] * cfg.local[1]
    syn = _randn((cfg.N, D), gen, device, dtype, grad=True)
    real = _randn((cfg.N_real, D), gen, device, dtype)
    s = syn.element_size()
    ns, nr = cfg.N, cfg.N_real
    costs = {"fwd": ((ns + nr) * D * s, (ns + nr) * D), "bwd": (ns * D * s, ns * D)}
    return _autograd_case("mean_matching_loss", provider, mode, cfg, device,
                          lambda: f(syn, real, syn_groups=cfg.K, real_groups=cfg.K), [syn], ctx, costs,
                          f"syn {tuple(syn.shape)}, real {tuple(real.shape)}, K={cfg.K}")


_SETUPS: dict[str, Callable[..., Case]] = {
    "dae_": _dae_case,
    "dae_sgd_step_": _dae_sgd_case,
    "grad_cam": _grad_cam_case,
    "cpd_trajectory_loss": _cpd_case,
    "local_covariance": _local_cov_case,
    "covariance_matching_loss": _cm_case,
    "class_centralization_loss": _cc_case,
    "mean_matching_loss": _mm_case,
}


def input_bytes(op: str, config: Config) -> int:
    """Bytes of the inputs :func:`make_case` allocates for ``op`` at ``config`` (fp32), without building them.

    Used to scale a config down on CPU before anything is allocated.
    """
    c = config
    if skip_reason(op, c):
        return 0
    img = c.N * c.image[0] * c.image[1] * c.image[2] * 4
    cam = c.N * c.cam[0] * c.cam[1] * c.cam[2] * 4
    if op == "dae_":
        return 2 * img  # grad and the pristine copy reset() restores from
    if op == "dae_sgd_step_":
        return 3 * img
    if op == "grad_cam":
        return (2 * c.cam_samples + 1) * cam
    if op == "cpd_trajectory_loss":
        return 3 * c.cpd_P * 4
    if op == "local_covariance":
        return c.N * c.local[0] * c.local[1] * 4
    if op in ("covariance_matching_loss", "mean_matching_loss"):
        return (c.N + c.N_real) * c.local[0] * c.local[1] * 4
    if op == "class_centralization_loss":
        return c.N * c.cc_dim * 4
    raise ValueError(op)


SCALES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


def fit_scale(op: str, config: Config, limit_bytes: float) -> float:
    """The largest of :data:`SCALES` at which ``op``'s inputs at ``config`` fit in ``limit_bytes``."""
    for s in SCALES:
        if input_bytes(op, config.scaled(s)) <= limit_bytes:
            return s
    return SCALES[-1]
