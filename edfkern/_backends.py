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


def _triton_probe() -> Optional[str]:
    """Cheap: looks for the module, imports nothing heavy unless triton is there."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must not take edfkern down
        return f"triton failed to import: {type(e).__name__}: {e}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)"
    return None


def _triton_devices() -> frozenset[str]:
    import os

    return frozenset({"cuda", "cpu"}) if os.environ.get("TRITON_INTERPRET") == "1" else frozenset({"cuda"})


register_backend(
    "triton",
    "edfkern.triton",
    probe=_triton_probe,
    devices=_triton_devices,
    description="fused Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)",
)
