"""Backend registry and selection.

A *backend* is a module of kernels that all follow the contract in
``edfkern/reference/__init__.py`` (same names, same arguments, same outputs).
The registered ``torch.library`` ops in ``edfkern/ops/`` never call a backend
directly: they ask :func:`kernel` for the implementation that matches the
current selection and the tensors' device.

Selection, strongest first:

1. ``with edfkern.use_backend(name):`` (context-local);
2. ``edfkern.set_backend(name)`` (process-wide);
3. the environment variable ``EDFKERN_BACKEND``;
4. ``"auto"``: CUDA tensors go to the fastest available backend for that op
   (:data:`AUTO_CUDA`), CPU tensors to ``native`` if it is built, else ``reference``.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

__all__ = ["register_backend", "set_backend", "use_backend", "backends", "current_backend", "kernel", "auto_backend"]


@dataclass
class Backend:
    """One registered backend.

    ``module`` is imported lazily, on the first kernel lookup. ``probe`` returns
    ``None`` when the backend can run, else a one-line reason. ``devices``
    returns the device types (``"cpu"``, ``"cuda"``) it can take tensors from.
    """

    name: str
    module: str
    probe: Callable[[], Optional[str]]
    devices: Callable[[], frozenset[str]]
    description: str
    _mod: object = field(default=None, repr=False)

    def load(self):
        if self._mod is None:
            self._mod = importlib.import_module(self.module)
        return self._mod


_BACKENDS: dict[str, Backend] = {}
_GLOBAL: Optional[str] = None
_CTX: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("edfkern_backend", default=None)

#: ``auto`` order for CUDA tensors, per kernel, edited by hand from measured timings (how: docs/gpu.md,
#: "The AUTO_CUDA table"). A kernel missing here gets ``_AUTO_CUDA_DEFAULT``. Empty: no GPU run has
#: yet measured triton against native.
AUTO_CUDA: dict[str, tuple[str, ...]] = {}
_AUTO_CUDA_DEFAULT = ("triton", "native", "reference")
_AUTO_CPU = ("native", "reference")


def register_backend(
    name: str,
    module: str,
    *,
    probe: Callable[[], Optional[str]],
    devices: Callable[[], frozenset[str]],
    description: str,
) -> None:
    """Add a backend to the registry (used by edfkern itself at import time)."""
    _BACKENDS[name] = Backend(name, module, probe, devices, description)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {['auto', *_BACKENDS]}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every later op call in this process.

    ``name`` is ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.
    Raises ``RuntimeError`` at once if that backend cannot run here.
    """
    global _GLOBAL
    _check_name(name)
    if name != "auto":
        _require_available(_BACKENDS[name])
    _GLOBAL = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``with edfkern.use_backend("reference"): ...``."""
    _check_name(name)
    if name != "auto":
        _require_available(_BACKENDS[name])
    token = _CTX.set(name)
    try:
        yield
    finally:
        _CTX.reset(token)


def current_backend() -> str:
    """The selection in force: context, then ``set_backend``, then ``EDFKERN_BACKEND``, then ``auto``."""
    name = _CTX.get() or _GLOBAL or os.environ.get("EDFKERN_BACKEND", "").strip() or "auto"
    return _check_name(name)


def _why_not(b: Backend) -> Optional[str]:
    try:
        return b.probe()
    except Exception as e:  # a probe must never take the package down
        return f"probe failed: {type(e).__name__}: {e}"


def _require_available(b: Backend) -> None:
    why = _why_not(b)
    if why is not None:
        raise RuntimeError(f"edfkern backend {b.name!r} is not available: {why}")


def backends() -> dict[str, dict[str, object]]:
    """Report every backend: ``{name: {"available": bool, "reason": str, "devices": [...], "description": str}}``."""
    out: dict[str, dict[str, object]] = {}
    for b in _BACKENDS.values():
        why = _why_not(b)
        out[b.name] = {
            "available": why is None,
            "reason": "ok" if why is None else why,
            "devices": sorted(b.devices()) if why is None else [],
            "description": b.description,
        }
    return out


_WRAPPED: dict[tuple[str, str], Callable] = {}


def _lookup(b: Backend, op: str) -> Optional[Callable]:
    """The backend's kernel, fed detached tensors with autograd off.

    Kernels compute values only; gradients come from the registered formulas. Under
    ``create_graph=True`` a backward op is called with grad mode on and inputs that require
    grad; a compiled kernel that calls ``at::mm_out`` from its own worker threads (where grad
    mode is on again) would then refuse to run. ``detach()`` shares storage, so in-place
    kernels still write the caller's tensors.
    """
    key = (b.name, op)
    fn = _WRAPPED.get(key)
    if fn is None:
        raw = getattr(b.load(), op, None)
        if raw is None:
            return None

        def fn(*args, _raw=raw):
            with torch.no_grad():
                return _raw(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

        fn.__name__ = fn.__qualname__ = op
        fn.__module__ = getattr(raw, "__module__", b.module)
        fn.__wrapped__ = raw
        _WRAPPED[key] = fn
    return fn


def kernel(op: str, device: torch.device) -> Callable:
    """The implementation of kernel ``op`` for tensors on ``device`` under the current selection.

    Raises ``RuntimeError`` (never falls back) when an explicitly chosen backend
    cannot run here or cannot take tensors on ``device``.
    """
    name = current_backend()
    dev = torch.device(device).type
    if name != "auto":
        b = _BACKENDS[name]
        _require_available(b)
        if dev not in b.devices():
            hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if name == "triton" else ""
            raise RuntimeError(f"edfkern backend {name!r} cannot take {dev} tensors{hint}")
        fn = _lookup(b, op)
        if fn is None:
            raise RuntimeError(f"edfkern backend {name!r} has no kernel {op!r}")
        return fn
    choice = auto_backend(op, dev)
    if choice is None:
        raise RuntimeError(f"edfkern: no backend can run {op!r} on {dev} tensors; see edfkern.backends()")
    return _lookup(_BACKENDS[choice], op)


def auto_backend(op: str, device: "torch.device | str") -> Optional[str]:
    """The backend ``auto`` sends kernel ``op`` to for tensors on ``device``, or None if none can.

    CUDA: the first available backend of ``AUTO_CUDA[op]`` (default triton, native, reference);
    CPU: native if built, else reference. The bench's default provider asks this function.
    """
    dev = torch.device(device).type
    order = AUTO_CUDA.get(op, _AUTO_CUDA_DEFAULT) if dev == "cuda" else _AUTO_CPU
    for cand in order:
        b = _BACKENDS.get(cand)
        if b is None or _why_not(b) is not None or dev not in b.devices():
            continue
        if _lookup(b, op) is not None:
            return cand
    return None
