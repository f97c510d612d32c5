"""Small pieces shared by the op families' registration code."""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, NoReturn, Optional

import torch
from torch import Tensor


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


def register_inplace_fake(op, check=None) -> None:
    """The fake of an in-place op (it returns nothing): calls ``check(**arguments)`` on the fake tensors,
    if given, with the op's arguments by name."""
    sig = inspect.signature(op._init_fn)

    def fake(*args, **kwargs) -> None:
        if check is not None:
            check(**sig.bind(*args, **kwargs).arguments)

    op.register_fake(fake)


@contextlib.contextmanager
def contiguous_outputs(*written: Optional[Tensor]) -> Iterator[tuple[Optional[Tensor], ...]]:
    """Contiguous stand-ins for the tensors an in-place kernel writes, copied back when the block ends
    without an error (a tensor that is already contiguous is its own stand-in)."""
    stand_ins = tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in written)
    yield stand_ins
    with torch.no_grad():
        for t, s in zip(written, stand_ins):
            if s is not t:
                t.copy_(s)
