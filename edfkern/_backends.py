"""The registered backends. Each block says how to tell whether it can run."""
from __future__ import annotations

from typing import Optional

from ._dispatch import register_backend


def _always() -> Optional[str]:
    return None


register_backend(
    "reference",
    "edfkern.reference",
    probe=_always,
    devices=lambda: frozenset({"cpu", "cuda"}),
    description="pure PyTorch, vectorised; the oracle",
)


def _native_probe() -> Optional[str]:
    from . import _extension

    return _extension.reason()


def _native_devices() -> frozenset[str]:
    from . import _extension

    return frozenset({"cpu", "cuda"}) if _extension.has_cuda() else frozenset({"cpu"})


register_backend(
    "native",
    "edfkern.native",
    probe=_native_probe,
    devices=_native_devices,
    description="compiled extension edfkern._C: C++ CPU kernels (OpenMP) and CUDA kernels; built with ninja on first use",
)
