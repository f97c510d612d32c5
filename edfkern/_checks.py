"""Argument checks and group handling shared by every op and every backend.

Every public op validates here *before* anything is written, so a failed check
never leaves a tensor half-updated. Messages name the argument and what was
expected (SPEC section 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GroupsArg = Union[int, Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and loss/covariance output) dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16, bfloat16 or float64), got {t.dtype}"
        )
    return t


def check_same_dtype(**tensors: Tensor) -> None:
    items = list(tensors.items())
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} must have the same dtype as {n0} ({t0.dtype}), got {t.dtype}")


def check_same_device(**tensors: Optional[Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} must be on the same device as {n0} ({t0.device}), got {t.device}")


def check_rank(name: str, t: Tensor, ranks: Sequence[int], layout: str) -> None:
    if t.dim() not in ranks:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def check_shape(name: str, t: Tensor, shape: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def check_number(name: str, v: object, *, lo: Optional[float] = None, hi: Optional[float] = None,
                 hi_open: bool = False, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def check_size(name: str, size: object) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Groups:
    """Class membership in CSR form, the layout every backend kernel takes.

    Row ``j`` of the class-sorted order is input row ``perm[j]`` (``perm`` is
    ``None`` when rows are already class-contiguous); class ``k`` owns sorted
    rows ``offsets[k] .. offsets[k+1]-1``. ``counts`` are the group sizes on
    the host, used for checks only.
    """

    perm: Optional[Tensor]
    offsets: Tensor
    counts: tuple[int, ...]

    @property
    def num_groups(self) -> int:
        return len(self.counts)


def _infer_k(name: str, groups: GroupsArg, num_groups: Optional[int]) -> Optional[int]:
    if isinstance(groups, bool):
        raise TypeError(f"{name} must be an int K or a 1-D integer label tensor, got bool")
    if isinstance(groups, int):
        if groups <= 0:
            raise ValueError(f"{name} must be a positive number of groups, got {groups}")
        if num_groups is not None and num_groups != groups:
            raise ValueError(f"num_groups={num_groups} disagrees with {name}={groups}")
        return groups
    if isinstance(groups, Tensor):
        return num_groups
    raise TypeError(f"{name} must be an int K or a 1-D integer label tensor, got {type(groups).__name__}")


def _check_labels(name: str, labels: Tensor, n: int, device: torch.device) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} labels must have shape (N,) = ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on the same device as the features ({device}), got {labels.device}")


def _build(name: str, groups: GroupsArg, n: int, k: Optional[int], device: torch.device) -> Groups:
    """CSR form of ``groups``; ``k=None`` infers K = max label + 1. One host sync for label tensors."""
    if isinstance(groups, int):
        if n % groups != 0:
            raise ValueError(f"{name}={groups} must divide the number of rows N={n}")
        ipc = n // groups
        offsets = torch.arange(groups + 1, device=device, dtype=torch.int64) * ipc
        return Groups(None, offsets, (ipc,) * groups)
    labels = groups.to(torch.int64)
    if n == 0:
        k = k or 1
        return Groups(None, torch.zeros(k + 1, device=device, dtype=torch.int64), (0,) * k)
    clamped = labels.clamp(0, k - 1) if k is not None else labels.clamp_min(0)
    counts = torch.bincount(clamped, minlength=k or 0)
    in_order = (labels[1:] >= labels[:-1]).all().view(1)  # a stable sort would leave the rows where they are
    lo_hi = torch.stack(torch.aminmax(labels))
    host = torch.cat([lo_hi, in_order.long(), counts]).tolist()
    lo, hi, in_order_h, counts_h = host[0], host[1], bool(host[2]), host[3:]
    k = hi + 1 if k is None else k
    if lo < 0 or hi >= k:
        raise ValueError(f"{name} labels must lie in [0, {k}), got values in [{lo}, {hi}]")
    offsets = torch.zeros(k + 1, device=device, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    perm = None if in_order_h else torch.sort(labels, stable=True).indices  # None: kernels skip the gather
    return Groups(perm, offsets, tuple(counts_h))


def _check_num_groups(num_groups: Optional[int]) -> None:
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")


def resolve_groups(groups: GroupsArg, n: int, device: torch.device, num_groups: Optional[int] = None,
                   name: str = "groups") -> Groups:
    """Normalise a ``groups`` argument (int K or N labels) for ``n`` rows on ``device``."""
    _check_num_groups(num_groups)
    k = _infer_k(name, groups, num_groups)
    if isinstance(groups, Tensor):
        _check_labels(name, groups, n, device)
    return _build(name, groups, n, k, device)


def resolve_group_pair(syn_groups: GroupsArg, real_groups: GroupsArg, n_syn: int, n_real: int,
                       device: torch.device, num_groups: Optional[int]) -> tuple[Groups, Groups]:
    """Normalise the two sides of a matching loss to the same K; raise on any empty group."""
    _check_num_groups(num_groups)
    ks = _infer_k("syn_groups", syn_groups, num_groups)
    kr = _infer_k("real_groups", real_groups, num_groups)
    if ks is not None and kr is not None and ks != kr:
        raise ValueError(f"syn_groups has {ks} groups but real_groups has {kr}; they must agree")
    for name, g, n in (("syn_groups", syn_groups, n_syn), ("real_groups", real_groups, n_real)):
        if isinstance(g, Tensor):
            _check_labels(name, g, n, device)
    k = ks if ks is not None else kr
    if k is None:  # both label tensors, no num_groups: K = max label + 1 over both sides
        k = max(int(syn_groups.max()), int(real_groups.max())) + 1
    gs = _build("syn_groups", syn_groups, n_syn, k, device)
    gr = _build("real_groups", real_groups, n_real, k, device)
    require_nonempty(gs, "syn")
    require_nonempty(gr, "real")
    return gs, gr


def require_nonempty(g: Groups, side: str) -> None:
    for k, c in enumerate(g.counts):
        if c == 0:
            raise ValueError(f"group {k} is empty on the {side} side; every group of a loss needs at least one row")


def row_labels(perm: Optional[Tensor], offsets: Tensor, n: int) -> Tensor:
    """Group label of every input row, int64 (N,), from the CSR form (for gathers in backward)."""
    k = offsets.numel() - 1
    sorted_labels = torch.repeat_interleave(torch.arange(k, device=offsets.device), offsets.diff(), output_size=n)
    if perm is None:
        return sorted_labels
    labels = torch.empty_like(sorted_labels)
    labels[perm] = sorted_labels
    return labels


def check_matching_pair(syn: Tensor, real: Tensor, syn_groups: GroupsArg, real_groups: GroupsArg,
                        num_groups: Optional[int], weight: float, feature: str) -> tuple[float, Groups, Groups]:
    """Shared checks of the two-sided matching losses: same per-row shape, dtype, device; groups; weight."""
    if syn.shape[1:] != real.shape[1:]:
        raise ValueError(f"real must have the same {feature} as syn {tuple(syn.shape[1:])}, got {tuple(real.shape[1:])}")
    check_same_dtype(syn=syn, real=real)
    check_same_device(syn=syn, real=real)
    weight = check_number("weight", weight)
    gs, gr = resolve_group_pair(syn_groups, real_groups, syn.shape[0], real.shape[0], syn.device, num_groups)
    return weight, gs, gr


def check_sgd_args(lr: float, momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool) -> tuple[float, float, float, float]:
    """torch.optim.SGD's hyper-parameter rules, shared by ``dae_sgd_step_`` and ``DAESGD``."""
    lr = check_number("lr", lr, lo=0.0)
    momentum = check_number("momentum", momentum, lo=0.0)
    dampening = check_number("dampening", dampening)
    weight_decay = check_number("weight_decay", weight_decay, lo=0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    return lr, momentum, dampening, weight_decay
