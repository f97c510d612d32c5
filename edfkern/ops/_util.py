"""Small pieces shared by the op families' registration code."""
from __future__ import annotations

from typing import NoReturn


def not_differentiable(op: str, arg: str, why: str):
    """An autograd formula that refuses, loudly, instead of returning a wrong gradient."""

    def backward(ctx, *grads) -> NoReturn:
        raise RuntimeError(f"edfkern.{op}: no gradient with respect to {arg}: {why}. Detach {arg} first.")

    return backward


def no_double_backward(op: str):
    """Autograd formula for a backward op: double backward is not implemented."""

    def backward(ctx, *grads) -> NoReturn:
        raise RuntimeError(f"edfkern.{op}: double backward is not supported")

    return backward


def keep_context(ctx, inputs, output) -> None:  # setup_context for formulas that need nothing
    return None
