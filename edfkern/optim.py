"""``DAESGD``: ``torch.optim.SGD`` with EDF's Discriminative Area Enhancement fused in (docs/ops.md).

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
from torch.utils.weak import WeakIdKeyDictionary

from . import _checks as C
from .ops.dae import as_cam, check_cam, check_step_tensors, dae_sgd_step_

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
    they are not in ``state_dict()`` and ``load_state_dict`` leaves them as they are; a copy
    (``copy.deepcopy``, pickling) carries them over to its own copies of the parameters.

    Stored CAMs are keyed by the parameter object itself, held weakly (never by its ``id``, which a
    new tensor can reuse once the old one is freed): a parameter that leaves the optimizer and is
    freed takes its CAM with it, and a tensor that is not the one given a CAM never inherits it.
    """

    def __init__(self, params, lr: float, momentum: float = 0, dampening: float = 0, weight_decay: float = 0,
                 nesterov: bool = False, *, maximize: bool = False, beta: float = 1.0,
                 threshold: Optional[float] = None) -> None:
        defaults = self._check_group(dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                          nesterov=nesterov, maximize=maximize, beta=beta, threshold=threshold))
        super().__init__(params, defaults)
        self._cams: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param (held weakly) -> stored CAM

    @staticmethod
    def _check_beta(beta: Any) -> float:
        return C.check_number("beta", beta)

    @staticmethod
    def _check_threshold(threshold: Any) -> Optional[float]:
        return None if threshold is None else C.check_number("threshold", threshold)

    _HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "beta", "threshold")

    @classmethod
    def _check_group(cls, group: Mapping[str, Any]) -> dict[str, Any]:
        """The hyper-parameters of one group (or of the defaults), checked and normalised.

        The constructor, :meth:`add_param_group` and every :meth:`step` (``param_groups`` may have
        been edited since) apply these same rules.
        """
        if isinstance(group.get("lr"), Tensor):
            raise TypeError("lr must be a float (a Tensor lr is not supported by DAESGD)")
        lr, momentum, dampening, weight_decay = C.check_sgd_args(
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"])
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=bool(group["nesterov"]), maximize=C.check_bool("maximize", group["maximize"]),
                    beta=cls._check_beta(group["beta"]), threshold=cls._check_threshold(group["threshold"]))

    def __getstate__(self) -> dict[str, Any]:
        """torch's optimizer state plus the stored CAMs, in the flat parameter order (pickling, deepcopy)."""
        return {**super().__getstate__(), "cams": [self._cams.get(p) for p in self._flat_params()]}

    def __setstate__(self, state: dict) -> None:
        """Unpickling, and ``load_state_dict`` (which calls it without ``cams``: stored CAMs stay)."""
        state = dict(state)
        cams = state.pop("cams", None)
        super().__setstate__(state)
        if cams is not None or "_cams" not in self.__dict__:
            self._cams = WeakIdKeyDictionary()
            for p, cam in zip(self._flat_params(), cams or []):
                if cam is not None:
                    self._cams[p] = cam
        for group in self.param_groups:  # e.g. a torch.optim.SGD state dict loaded into DAESGD
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("beta", self.defaults.get("beta", 1.0))
            group.setdefault("threshold", self.defaults.get("threshold", None))

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.SGD.add_param_group``, with the constructor's checks on the merged group."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k in self._HYPER}}
        checked = self._check_group(merged)
        for key in self._HYPER:
            if key in param_group:
                param_group[key] = checked[key]
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
        if not isinstance(cam, Tensor):
            raise TypeError(f"cam must be a torch.Tensor or None, got {type(cam).__name__}")
        if p.dim() != 4:
            raise ValueError(f"a CAM needs an image parameter of shape (N, C, H, W), got {tuple(p.shape)}")
        check_cam(as_cam(cam), p.shape[0], p.device)  # float, (N, h, w) or (N, 1, h, w), non-empty
        return cam.detach()

    def set_cam(self, param_or_index: ParamRef, cam: Optional[Tensor]) -> None:
        """Store ``cam`` for a parameter (or clear it with ``None``) until replaced."""
        p = self._resolve(param_or_index, self._flat_params())
        if cam is None:
            self._cams.pop(p, None)
        else:
            self._cams[p] = self._check_cam(p, cam)

    def get_cam(self, param_or_index: ParamRef) -> Optional[Tensor]:
        """The stored CAM of a parameter, or ``None``."""
        return self._cams.get(self._resolve(param_or_index, self._flat_params()))

    def clear_cams(self) -> None:
        self._cams.clear()

    def _step_cams(self, cams: CamsArg, flat: list[Tensor]) -> dict[Tensor, Optional[Tensor]]:
        """This step's CAM of every parameter in ``flat`` (keyed by the parameter, as ``self.state``):
        the stored ones, overridden by ``cams``."""
        out: dict[Tensor, Optional[Tensor]] = {p: self._cams.get(p) for p in flat}
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
            out[p] = None if cam is None else self._check_cam(p, cam)
        return out

    # ------------------------------------------------------------------ step

    def _check_state(self, groups: list[dict]) -> None:
        """Loaded momentum buffers must be tensors like their parameter."""
        for group in groups:
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                buf = self.state.get(p, {}).get("momentum_buffer") if p in self.state else None
                if buf is None:
                    continue
                if not isinstance(buf, Tensor):
                    raise TypeError(f"state momentum_buffer of a parameter {tuple(p.shape)} must be a tensor, "
                                    f"got {type(buf).__name__}")
                if buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                    raise ValueError(f"state momentum_buffer must match its parameter {tuple(p.shape)} {p.dtype} "
                                     f"{p.device}, got {tuple(buf.shape)} {buf.dtype} {buf.device}")

    def _plan(self, groups: list[dict], step_cams: dict[Tensor, Optional[Tensor]]) -> None:
        """Every check that needs this step's gradients, for every parameter, before the first write."""
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                cam = step_cams.get(p)
                if cam is None:
                    if p.grad.shape != p.shape:
                        raise ValueError(f"the gradient of a parameter {tuple(p.shape)} has shape {tuple(p.grad.shape)}")
                    continue
                if p.grad.is_sparse:
                    raise ValueError("DAESGD: a parameter with a CAM cannot have a sparse gradient")
                buf = self.state[p].get("momentum_buffer") if p in self.state else None
                check_step_tensors(p, p.grad, buf, as_cam(cam), group["momentum"] if buf is not None else 0.0)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, cams: CamsArg = None):
        """One optimisation step; returns ``closure()``'s value when a closure is given.

        All or nothing: every group's hyper-parameters, every CAM, every loaded momentum buffer and
        every (param, grad, buffer, CAM) combination is checked before the first parameter is
        written, so a rejected step leaves parameters and state exactly as they were.
        """
        groups = [{**g, **self._check_group(g)} for g in self.param_groups]
        flat = self._flat_params()
        step_cams = self._step_cams(cams, flat)
        self._check_state(groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._plan(groups, step_cams)
        for group in groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Optional[Tensor]] = []
            has_sparse = False
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                cam = step_cams.get(p)
                if cam is None:  # plain SGD, collected as torch.optim.SGD._init_group does
                    params.append(p)
                    grads.append(p.grad)
                    has_sparse = has_sparse or p.grad.is_sparse
                    if momentum != 0:
                        bufs.append(self.state[p].get("momentum_buffer"))
                    continue
                buf, first = None, False
                if momentum != 0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:  # torch creates it on the first step; the op fills it
                        buf, first = torch.empty_like(p, memory_format=torch.contiguous_format), True
                dae_sgd_step_(p, p.grad, buf, cam, lr=group["lr"], beta=group["beta"], threshold=group["threshold"],
                              momentum=momentum, dampening=group["dampening"], weight_decay=group["weight_decay"],
                              nesterov=group["nesterov"], maximize=group["maximize"], first_step=first)
                if first:  # stored only once filled: a failed step never leaves an uninitialised buffer
                    self.state[p]["momentum_buffer"] = buf
            if params:
                _sgd_functional(params, grads, bufs, weight_decay=group["weight_decay"], momentum=momentum,
                                lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                                maximize=group["maximize"], has_sparse_grad=has_sparse, foreach=None, fused=None)
                if momentum != 0:
                    for p, b in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = b
        return loss
