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
