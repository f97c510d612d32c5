"""The ``native`` backend: the kernel contract (edfkern/reference/__init__.py) on ``edfkern._C``.

``edfkern._C`` (csrc/edfkern.cpp) defines one function per contract kernel, with the contract's
names and arguments; each checks its arguments (bad input gets a ``TypeError``/``ValueError``) and
runs the C++ CPU kernels or, when built with CUDA, the CUDA kernels. They are plain functions, not
``torch.library`` ops: the registered layer is ``edfkern::`` (``edfkern/ops``), which calls them.
This module only loads the extension (building it if needed; the registry imports it once the
probe has succeeded) and re-exports those functions.
"""
from __future__ import annotations

from . import _extension
from .reference import __all__ as _CONTRACT

_C, _why = _extension.load()
if _C is None:
    raise ImportError(f"edfkern native extension unavailable: {_why}")

__all__ = list(_CONTRACT)
globals().update({name: getattr(_C, name) for name in __all__})
