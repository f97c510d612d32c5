"""``DAESGD``: ``torch.optim.SGD`` with EDF's Discriminative Area Enhancement fused in (SPEC section 2).

EDF's loop does, every step::

    loss.backward()
    image_syn.grad *= create_soft_mask(cams, ...)   # per-image mask loop, (N, 1, H, W) in memory
    optimizer_img.step()                             # torch.optim.SGD, momentum 0.5

``DAESGD`` replaces the last two lines with ``optimizer_img.step()`` after ``set_cam``
(or ``step(cams=...)``): for a parameter with a CAM it makes one
:func:`edfkern.dae_sgd_step_` call (mask on the fly, masked gradient never stored,
``.grad`` left untouched); for every other parameter it runs torch's own SGD update,
so without CAMs it *is* ``torch.optim.SGD``, bit for bit. The state layout is SGD's
(``state[p]["momentum_buffer"]``), so state dicts move between the two.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _sgd_functional

from . import _checks as C
from .ops.dae import dae_sgd_step_

__all__ = ["DAESGD"]

ParamRef = Union[Tensor, int]
CamsArg = Union[None, Tensor, Mapping[ParamRef, Optional[Tensor]], Sequence[Optional[Tensor]]]


class DAESGD(Optimizer):
    """SGD whose update for image parameters is scaled by EDF's DAE mask.

    Args:
        params: iterable of tensors or parameter groups, as for ``torch.optim.SGD``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: ``torch.optim.SGD``'s arguments,
            with the same checks and the same meaning (EDF: ``lr_img`` 100-1000, ``momentum=0.5``).
        beta: added to the upsampled CAM where it passes the threshold (EDF: 1 or 2). Per group.
        threshold: ``None`` (or 0) for each image's mean upsampled CAM, else a fixed value. Per group.

    CAMs (``(N, h, w)`` or ``(N, 1, h, w)``, one per image of an ``(N, C, H, W)`` parameter):

    * ``set_cam(param_or_index, cam)`` stores a CAM until it is replaced or cleared with ``None``
      (EDF refreshes CAMs every ``interval`` steps and reuses them in between);
    * ``step(cams=...)`` gives CAMs for this step only, overriding stored ones: a mapping from
      parameter (or its index in the flat parameter order) to CAM, a list aligned with that order
      (``None`` for "no CAM"), or a single tensor when the optimizer holds one parameter.

    A parameter with no CAM gets exactly ``torch.optim.SGD``'s update. CAMs are inputs, not state:
    they are not in ``state_dict()``.
    """

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, *, maximize: bool = False, beta: float = 1.0,
                 threshold: Optional[float] = None) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("lr must be a float (a Tensor lr is not supported by DAESGD)")
        lr, momentum, dampening, weight_decay = C.check_sgd_args(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), maximize=bool(maximize), beta=self._check_beta(beta),
                        threshold=self._check_threshold(threshold))
        super().__init__(params, defaults)
        self._cams: dict[int, Tensor] = {}  # id(param) -> stored CAM

    @staticmethod
    def _check_beta(beta: Any) -> float:
        return C.check_number("beta", beta)

    @staticmethod
    def _check_threshold(threshold: Any) -> Optional[float]:
        return None if threshold is None else C.check_number("threshold", threshold)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # e.g. a torch.optim.SGD state dict loaded into DAESGD
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("beta", self.defaults.get("beta", 1.0))
            group.setdefault("threshold", self.defaults.get("threshold", None))

    def add_param_group(self, param_group: dict) -> None:
        for key, check in (("beta", self._check_beta), ("threshold", self._check_threshold),
                           ("lr", lambda v: C.check_number("lr", v, lo=0.0))):
            if key in param_group:
                param_group[key] = check(param_group[key])
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ CAMs

    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _resolve(self, ref: ParamRef, flat: list[Tensor]) -> Tensor:
        if isinstance(ref, bool):
            raise TypeError("param_or_index must be a parameter of this optimizer or an int index, got bool")
        if isinstance(ref, int):
            if not -len(flat) <= ref < len(flat):
                raise IndexError(f"parameter index {ref} out of range: the optimizer holds {len(flat)} parameters")
            return flat[ref]
        if isinstance(ref, Tensor):
            if not any(ref is p for p in flat):
                raise ValueError(f"tensor of shape {tuple(ref.shape)} is not a parameter of this optimizer")
            return ref
        raise TypeError(f"param_or_index must be a tensor or an int, got {type(ref).__name__}")

    @staticmethod
    def _check_cam(p: Tensor, cam: Tensor) -> Tensor:
        C.check_float_tensor("cam", cam)
        if p.dim() != 4:
            raise ValueError(f"a CAM needs an image parameter of shape (N, C, H, W), got {tuple(p.shape)}")
        c = cam[:, 0] if cam.dim() == 4 and cam.shape[1] == 1 else cam
        if c.dim() != 3 or c.shape[0] != p.shape[0]:
            raise ValueError(f"cam must have shape (N, h, w) or (N, 1, h, w) with N={p.shape[0]}, "
                             f"got {tuple(cam.shape)}")
        if cam.device != p.device:
            raise ValueError(f"cam must be on the parameter's device ({p.device}), got {cam.device}")
        return cam.detach()

    def set_cam(self, param_or_index: ParamRef, cam: Optional[Tensor]) -> None:
        """Store ``cam`` for a parameter (or clear it with ``None``) until replaced."""
        p = self._resolve(param_or_index, self._flat_params())
        if cam is None:
            self._cams.pop(id(p), None)
        else:
            self._cams[id(p)] = self._check_cam(p, cam)

    def get_cam(self, param_or_index: ParamRef) -> Optional[Tensor]:
        """The stored CAM of a parameter, or ``None``."""
        return self._cams.get(id(self._resolve(param_or_index, self._flat_params())))

    def clear_cams(self) -> None:
        self._cams.clear()

    def _step_cams(self, cams: CamsArg, flat: list[Tensor]) -> dict[int, Optional[Tensor]]:
        """This step's CAMs by id(param): stored ones, overridden by ``cams``."""
        out: dict[int, Optional[Tensor]] = dict(self._cams)
        if cams is None:
            return out
        if isinstance(cams, Tensor):
            if len(flat) != 1:
                raise ValueError(f"cams may be a single tensor only when the optimizer holds one parameter, "
                                 f"it holds {len(flat)}; pass a mapping or a list")
            items = [(flat[0], cams)]
        elif isinstance(cams, Mapping):
            items = [(self._resolve(k, flat), v) for k, v in cams.items()]
        elif isinstance(cams, (list, tuple)):
            if len(cams) != len(flat):
                raise ValueError(f"cams list must have one entry per parameter ({len(flat)}), got {len(cams)}")
            items = list(zip(flat, cams))
        else:
            raise TypeError(f"cams must be a tensor, a mapping or a list, got {type(cams).__name__}")
        for p, cam in items:
            out[id(p)] = None if cam is None else self._check_cam(p, cam)
        return out

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, cams: CamsArg = None):
        """One optimisation step; returns ``closure()``'s value when a closure is given."""
        flat = self._flat_params()
        step_cams = self._step_cams(cams, flat)  # all checks before anything is written
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Optional[Tensor]] = []
            has_sparse = False
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                cam = step_cams.get(id(p))
                if cam is None:  # plain SGD, collected as torch.optim.SGD._init_group does
                    params.append(p)
                    grads.append(p.grad)
                    has_sparse = has_sparse or p.grad.is_sparse
                    if momentum != 0:
                        bufs.append(self.state[p].get("momentum_buffer"))
                    continue
                if p.grad.is_sparse:
                    raise ValueError("DAESGD: a parameter with a CAM cannot have a sparse gradient")
                buf, first = None, False
                if momentum != 0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:  # torch creates it on the first step; the op fills it
                        buf, first = torch.empty_like(p), True
                        self.state[p]["momentum_buffer"] = buf
                dae_sgd_step_(p, p.grad, buf, cam, lr=group["lr"], beta=group["beta"], threshold=group["threshold"],
                              momentum=momentum, dampening=group["dampening"], weight_decay=group["weight_decay"],
                              nesterov=group["nesterov"], maximize=group["maximize"], first_step=first)
            if params:
                _sgd_functional(params, grads, bufs, weight_decay=group["weight_decay"], momentum=momentum,
                                lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                                maximize=group["maximize"], has_sparse_grad=has_sparse, foreach=None, fused=None)
                if momentum != 0:
                    for p, b in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = b
        return loss
