"""Record the Triton specialisations the launchers choose at the named configurations.

Every launcher of :mod:`edfkern.triton` is called at the shapes of every named config of
:mod:`edfkern.bench.configs` (the real sizes, on ``meta`` tensors, so nothing is allocated
and nothing runs), in float32, float16, bfloat16 and float64, with int groups (no ``perm``)
and label groups (a ``perm``). :func:`capture_launches` patches the launcher modules from
outside so that each launch is recorded instead of run, with the grid heuristics sized for an
H100/H200 (132 multiprocessors), so the tile and split choices are those a real run would make.

Each launch becomes a :class:`Spec`: the kernel, its Triton signature (argument types with
the 16-byte divisibility Triton would specialise on), its constexprs, ``num_warps`` and
``num_stages``: exactly what ``triton.compile`` needs, deduplicated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from typing import Any, Callable, Iterator, Optional

import torch

from edfkern.bench.configs import CONFIGS, Config

#: Multiprocessors of an H100 SXM / H200 (the grid heuristics' assumption while capturing).
H200_SMS = 132
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_NUM_STAGES = 3  # Triton's CUDA default when a launcher passes none
DTYPE_PREFIX = "tl."  # a constexpr that is a Triton dtype is stored as "tl.fp32" etc.


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compile-ready specialisation of one kernel."""

    module: str                       # e.g. "edfkern.triton.covariance"
    kernel: str                       # e.g. "_cov_bwd_kernel"
    signature: tuple[tuple[str, str], ...]  # (arg name, Triton type or "constexpr")
    constexprs: tuple[tuple[str, Any], ...]  # (arg name, value); tl dtypes as their str
    divisible: tuple[int, ...]        # indices of arguments Triton specialises as 16-divisible
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.kernel}"

    def describe(self) -> str:
        """Short human form: pointer dtypes and the constexprs, e.g. ``*fp32,*i64 | BM=64 ... w4 s3``."""
        ptrs = ",".join(t for _, t in self.signature if t.startswith("*"))
        cx = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{ptrs} | {cx} | w{self.num_warps} s{self.num_stages}"

    def to_json(self) -> dict:
        return {"module": self.module, "kernel": self.kernel, "signature": [list(s) for s in self.signature],
                "constexprs": [[k, v] for k, v in self.constexprs], "divisible": list(self.divisible),
                "num_warps": self.num_warps, "num_stages": self.num_stages}


def _constexpr_value(v: Any) -> Any:
    """Hashable, JSON-friendly form of a constexpr (tl dtypes become e.g. ``'fp32'``)."""
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return DTYPE_PREFIX + str(v)
    if isinstance(v, tl.constexpr):
        return _constexpr_value(v.value)
    return v


def spec_of(kernel, args: tuple, kwargs: dict) -> Spec:
    """The specialisation Triton's JIT would compile for ``kernel[grid](*args, **kwargs)``.

    Mirrors ``triton.runtime.jit``: constexpr parameters keep their value; every other
    argument goes through Triton's own ``native_specialize_impl`` (a tensor becomes
    ``*<dtype>``, divisible by 16 if its address is; an int 1 becomes a constexpr; annotated
    floats are not specialised; ``do_not_specialize`` arguments keep only their type).
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{kernel!r} is not a compiled-mode JITFunction: run without TRITON_INTERPRET=1")
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    sig, cx, div = [], [], []
    for i, (kp, (name, val)) in enumerate(zip(kernel.params, bound.arguments.items())):
        if kp.is_constexpr:
            sig.append((name, "constexpr"))
            cx.append((name, _constexpr_value(val)))
            continue
        specialize, align = not kp.do_not_specialize, not kp.do_not_specialize_on_alignment
        ann = kp.annotation_type
        if ann and isinstance(ann, str) and (ann == "u1" or ann[:2] in ("fp", "bf")):
            ty, attr = ann, None
        else:
            ty, attr = native_specialize_impl(BaseBackend, val, kp.is_const, specialize, align)
            if ann:
                ty = ann
        if ty == "constexpr":
            sig.append((name, "constexpr"))
            cx.append((name, attr if attr is not None else val))
            continue
        sig.append((name, ty))
        if attr == "D":
            div.append(i)
    return Spec(kernel.fn.__module__, kernel.fn.__name__, tuple(sig), tuple(cx), tuple(div),
                int(options.get("num_warps", 4)), int(options.get("num_stages", DEFAULT_NUM_STAGES)))


# ----------------------------------------------------------------------------- recording launches

#: The launcher modules: each launches its own module-level ``@triton.jit`` kernels as ``kernel[grid](...)``.
LAUNCHER_MODULES = ("edfkern.triton.covariance", "edfkern.triton.cpd", "edfkern.triton.dae",
                    "edfkern.triton.features", "edfkern.triton.gradcam")


class _Recorder:
    """Stands in for one kernel: ``recorder[grid](*args, **kwargs)`` logs ``(kernel, grid, args, kwargs)``."""

    def __init__(self, kernel, log: list) -> None:
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.log.append((self.kernel, tuple(grid), args, dict(kwargs)))
        return record


@contextlib.contextmanager
def capture_launches(sm_count: Optional[int] = None, precision: Optional[str] = None) -> Iterator[list]:
    """Record every Triton launch of the launchers instead of running it (their results are garbage).

    Yields the list of ``(kernel, grid, args, kwargs)``. Inside the block every module of
    :data:`LAUNCHER_MODULES` has its kernels replaced by recorders, its ``device_sm_count``
    answering ``sm_count`` (when given: grids sized for a device with that many multiprocessors)
    and its ``dot_precision`` answering ``precision`` (when given: the tl.dot input precision,
    e.g. ``"tf32"``); the originals are put back on exit. Works with meta tensors, so real sizes
    cost no memory.
    """
    from triton.runtime.jit import JITFunction

    log: list = []
    with contextlib.ExitStack() as undo:
        for name in LAUNCHER_MODULES:
            mod = importlib.import_module(name)
            patches = {k: _Recorder(v, log) for k, v in vars(mod).items()
                       if isinstance(v, JITFunction) and v.fn.__module__ == name}
            if sm_count is not None and hasattr(mod, "device_sm_count"):
                patches["device_sm_count"] = lambda: sm_count
            if precision is not None and hasattr(mod, "dot_precision"):
                patches["dot_precision"] = lambda: precision
            for attr, new in patches.items():
                undo.callback(setattr, mod, attr, getattr(mod, attr))
                setattr(mod, attr, new)
        yield log


# ----------------------------------------------------------------------------- scenarios

def _csr(n: int, K: int, labels: bool) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(perm, offsets) for n rows in K equal classes; perm only for label groups."""
    perm = torch.empty(n, dtype=torch.int64, device="meta") if labels else None
    return perm, torch.empty(K + 1, dtype=torch.int64, device="meta")


def _e(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scenarios(cfg: Config, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(label, thunk) for every launcher call a run at ``cfg`` in ``dtype`` makes."""
    import edfkern.triton as T

    C3, H, W = cfg.image
    Cc, h, w = cfg.cam
    N, K = cfg.N, cfg.K
    acc = _acc(dtype)
    cam = _e((N, h, w), torch.float32 if dtype != torch.float64 else dtype)
    img = (N, C3, H, W)
    yield "dae_mask", lambda: T.dae_mask(cam, 1.0, None, H, W)
    yield "dae_mask thr", lambda: T.dae_mask(cam, 1.0, 0.5, H, W)
    yield "dae_", lambda: T.dae_(_e(img, dtype), cam, cfg.beta, None)
    for first in (False, True):
        yield f"dae_sgd_step_ first={first}", lambda first=first: T.dae_sgd_step_(
            _e(img, dtype), _e(img, dtype), _e(img, dtype), cam, 100.0, cfg.beta, None, 0.5, 0.0, 0.0,
            False, False, first)
    yield "dae_sgd_step_ no momentum", lambda: T.dae_sgd_step_(
        _e(img, dtype), _e(img, dtype), None, cam, 100.0, cfg.beta, None, 0.0, 0.0, 0.0, False, False, False)
    S = cfg.cam_samples
    A, G = _e((N, Cc, h, w), dtype), _e((N, Cc, h, w), dtype)
    for method in ("gradcam", "gradcam++"):
        yield f"grad_cam {method}", lambda m=method: T.grad_cam(A, G, None, m, True, None)
    As, Gs = _e((S, N, Cc, h, w), dtype), _e((S, N, Cc, h, w), dtype)
    yield "grad_cam smoothgradcam++", lambda: T.grad_cam(As, Gs, A, "smoothgradcam++", True, None)
    yield "grad_cam smoothgradcam++ upsampled", lambda: T.grad_cam(As, Gs, A, "smoothgradcam++", True, [H, W])
    if cfg.cpd_P is not None:
        P = cfg.cpd_P
        k = int(cfg.drop_ratio * P)
        v = [_e((P,), dtype) for _ in range(3)]
        yield "cpd_forward", lambda: T.cpd_forward(*v, k)
        yield "cpd_forward k=0", lambda: T.cpd_forward(*v, 0)
        z = [_e((), acc) for _ in range(3)]
        yield "cpd_backward", lambda: T.cpd_backward(z[0], *v, z[1], _e((), torch.int64), z[2])
        yield "cpd_keep_mask", lambda: T.cpd_keep_mask(v[0], k)
    for labels in (False, True):
        tag = "labels" if labels else "int"
        if cfg.local is not None:
            C, L = cfg.local
            for who, n in (("syn", N), ("real", cfg.N_real)):
                perm, off = _csr(n, K, labels)
                x = _e((n, C, L), dtype)
                yield f"cov_forward {who} {tag}", lambda x=x, perm=perm, off=off: T.cov_forward(x, perm, off)
                yield f"seg_mean {who} {tag}", lambda n=n, perm=perm, off=off: T.seg_mean(
                    _e((n, C * L), dtype), perm, off)
            perm, off = _csr(N, K, labels)
            yield f"cov_backward {tag}", lambda perm=perm, off=off: T.cov_backward(
                _e((N, C, L), dtype), perm, off, _e((K, C, L), acc), _e((K, C, C), acc))
        if cfg.cc_dim is not None:
            perm, off = _csr(N, K, labels)
            f = _e((N, cfg.cc_dim), dtype)
            yield f"cc_forward {tag}", lambda f=f, perm=perm, off=off: T.cc_forward(f, perm, off)
            yield f"cc_backward {tag}", lambda f=f, perm=perm, off=off: T.cc_backward(
                _e((), acc), f, perm, off, _e((K, cfg.cc_dim), acc), 0.1)


#: tl.dot input precisions captured besides the default: "tf32" is what ``edfkern.config.allow_tf32``
#: selects; "tf32x3" (three TF32 products, near-fp32 accuracy) is a candidate CUDA default.
VARIANT_PRECISIONS = ("tf32", "tf32x3")


def capture(configs: Optional[list[str]] = None, dtypes=DTYPES, sm_count: int = H200_SMS,
            precision: Optional[str] = None, only: Optional[tuple[str, ...]] = None) -> dict[Spec, list[str]]:
    """Every distinct specialisation, with the ``config dtype scenario`` labels that chose it.

    ``precision`` runs the launchers with that tl.dot input precision; ``only`` keeps the
    scenarios whose label starts with one of these prefixes (e.g. ``("cov_",)``)."""
    found: dict[Spec, list[str]] = {}
    for name in configs or list(CONFIGS):
        cfg = CONFIGS[name]
        for dtype in dtypes:
            for label, thunk in scenarios(cfg, dtype):
                if only and not label.startswith(only):
                    continue
                with capture_launches(sm_count=sm_count, precision=precision) as log:
                    thunk()
                for kernel, _grid, args, kwargs in log:
                    spec = spec_of(kernel, args, kwargs)
                    found.setdefault(spec, []).append(f"{name} {str(dtype)[6:]} {label}")
    return found
