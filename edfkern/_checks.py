"""Argument checks and group handling shared by every op and every backend.

Every public op validates here *before* anything is written, so a failed check
never leaves a tensor half-updated. Messages name the argument and what was
expected (docs/ops.md).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GroupsArg = Union[int, Tensor]

#: Largest extent of one output dimension (``size``, ``H``, ``W``) and largest element count of
#: one output tensor the ops agree to allocate: beyond these the request is a mistake, not a job.
MAX_DIM = 2**31 - 1
MAX_NUMEL = 2**40


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation (and loss/covariance output) dtype: float64 if any of ``dtypes`` is float64, else float32.

    One dtype for most ops; DAE passes two (the CAM's and that of the tensor it scales, docs/ops.md):
    its mask is computed in float64 when either is float64.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_tensor(name: str, t: object) -> Tensor:
    """A ``torch.Tensor`` (what an op's schema needs before its own checks can run)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_tensor(name: str, t: object) -> Tensor:
    check_tensor(name, t)
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


def _is_real(v: object) -> bool:
    """Python and numpy real numbers (``numbers.Real``); never bools, tensors or strings."""
    if isinstance(v, (bool, np.bool_)):  # numpy's bool is no number either
        return False
    return isinstance(v, numbers.Real)


def as_float(name: str, v: object) -> float:
    """A real scalar (``int``, ``float``, numpy scalar) as a Python float; any value, NaN and inf included."""
    if not _is_real(v):
        raise TypeError(f"{name} must be a real number (int, float or numpy scalar), got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer of {len(str(abs(int(v))))} digits, too large "
                         "for a float") from None


def check_number(name: str, v: object, *, lo: Optional[float] = None, hi: Optional[float] = None,
                 hi_open: bool = False, lo_open: bool = False) -> float:
    """A finite real scalar as a Python float.

    Accepted: ``int``, ``float`` and numpy scalars of any width (``np.float32(0.5)`` as well as
    ``np.float64``). Refused with ``TypeError``: bools, tensors (a 0-d tensor would need a host
    sync on CUDA and a graph break under torch.compile; call ``.item()`` yourself), strings and
    anything else. Values that do not fit a float (``10**400``), NaN and inf are ``ValueError``.
    """
    f = as_float(name, v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {f}")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {f}")
    if hi is not None and (f > hi or (hi_open and f == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {f}")
    return f


def check_bool(name: str, v: object) -> bool:
    """A flag: ``True``/``False`` (or a numpy bool). Strings such as ``"no"`` are refused, not read as true."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")


def check_int(name: str, v: object, *, lo: int = 1, hi: int = MAX_DIM) -> int:
    """An integer in ``[lo, hi]`` (Python or numpy integer; bools and floats refused)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    i = int(v)
    if not lo <= i <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {i}")
    return i


def check_size(name: str, size: object) -> tuple[int, int]:
    """``(H, W)``: a tuple or list of two positive ints (numpy ints too), each at most ``MAX_DIM``."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{name} must be a pair of positive ints (H, W), got {size!r}")
    try:
        h, w = (check_int(name, s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of ints (H, W) in [1, {MAX_DIM}], got {size!r}") from None
    return h, w


def check_numel(name: str, shape: Sequence[int]) -> None:
    """Refuse an output of more than ``MAX_NUMEL`` elements before asking the allocator for it."""
    n = math.prod([int(s) for s in shape])  # a list, not a generator: torch.compile traces it
    if n > MAX_NUMEL:
        raise ValueError(f"{name} must hold at most {MAX_NUMEL:.3e} elements; shape {tuple(shape)} would hold {n:.3e}")


def check_optional_tensor(name: str, t: object) -> Optional[Tensor]:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    return t


# --------------------------------------------------------------------------- op arguments shared by the
# single-process ops (edfkern/ops) and their multi-rank paths (edfkern/distributed)


def as_ncl(name: str, x: object, *, empty_rows: bool = False) -> Tensor:
    """Conv features as ``(N, C, L)``: ``(N, C, h, w)`` is flattened, ``(N, D)`` read as ``(N, D, 1)``.

    ``empty_rows``: a rank of a process group may hold ``N = 0`` rows; one process needs ``N >= 1``.
    """
    check_float_tensor(name, x)
    check_rank(name, x, (2, 3, 4), "(N, C, L), (N, C, h, w) or (N, D)")
    if empty_rows:
        if any(s == 0 for s in x.shape[1:]):
            raise ValueError(f"{name} must have non-empty per-row features, got {tuple(x.shape)}")
    elif x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have N >= 1 rows and non-empty features, got {tuple(x.shape)}")
    return x.flatten(2) if x.dim() == 4 else (x.unsqueeze(2) if x.dim() == 2 else x)


def as_rows(name: str, x: object, *, empty_rows: bool = False) -> Tensor:
    """Flat features ``(N, D)``; other shapes are flattened per row (``empty_rows`` as in :func:`as_ncl`)."""
    check_float_tensor(name, x)
    if empty_rows:
        if x.dim() < 2 or any(s == 0 for s in x.shape[1:]):
            raise ValueError(f"{name} must have shape (N, D) with D >= 1 (other shapes are flattened per row), "
                             f"got {tuple(x.shape)}")
    elif x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1 (other shapes are flattened per row), "
                         f"got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1) if x.dim() != 2 else x


def check_drop_ratio(drop_ratio: object) -> float:
    """CPD's ``drop_ratio`` in ``[0, 1)``. At 1 or above nothing is kept; the message says what EDF's code does then."""
    f = check_number("drop_ratio", drop_ratio, lo=0.0)
    if f >= 1.0:
        raise ValueError(
            f"drop_ratio must be < 1.0, got {f}: it would drop every element and leave nothing to match. "
            "EDF's released code (distill/edf_distill.py, whose loss_threshold defaults to 1.0 in utils/cfg.py "
            "for configs that do not set it) would silently skip the update there, with no error: its kept set "
            "is empty, the loss is 0/0 = NaN, and 'grand_loss <= threshold' is never true, so the images are "
            "never updated. "
            "Use the configs' values (0.25-0.5), or 0 to keep every element.")
    return f


def drop_count(drop_ratio: float, p: int) -> int:
    """CPD's ``k``: how many of the ``p`` entries are dropped, ``floor(drop_ratio * p)``."""
    return int(math.floor(drop_ratio * p))


def check_cpd_vectors(student: object, target: object, start: object) -> None:
    """CPD's three flat vectors: floating, one shape, dtype and device (a rank's chunk may be empty)."""
    for name, v in (("student", student), ("target", target), ("start", start)):
        check_float_tensor(name, v)
    check_shape("target", target, student.shape, "(P,) like student")
    check_shape("start", start, student.shape, "(P,) like student")
    check_same_dtype(student=student, target=target, start=start)
    check_same_device(student=student, target=target, start=start)


# --------------------------------------------------------------------------- aliasing


def _extent(t: Tensor) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` of ``t`` inside its storage."""
    size = t.element_size()
    lo = hi = t.storage_offset()
    for n, st in zip(t.shape, t.stride()):
        if n > 1:
            if st >= 0:
                hi += (n - 1) * st
            else:
                lo += (n - 1) * st
    return lo * size, (hi + 1) * size


def _has_internal_overlap(t: Tensor) -> bool:
    """True when two elements of ``t`` may share memory (stride 0, or an ``as_strided`` layout whose
    strides cannot be ordered so each one clears the extent of the smaller ones)."""
    if t.numel() <= 1 or t.is_contiguous():
        return False
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1)
    reach = 0  # elements spanned by the dimensions seen so far, minus one
    for st, n in dims:
        if st <= reach:
            return True
        reach += (n - 1) * st
    return False


def check_writable(name: str, t: Tensor) -> None:
    """An output of an in-place op must give each element its own memory."""
    if not torch.compiler.is_compiling() and _has_internal_overlap(t):
        raise ValueError(f"{name} must not overlap itself (stride 0 from expand(), or a self-overlapping "
                         f"as_strided view; shape {tuple(t.shape)}, stride {t.stride()}); pass .clone()")


def check_no_alias(written: Sequence[str], **tensors: Optional[Tensor]) -> None:
    """No tensor in ``written`` (modified in place) may share memory with any other argument.

    Two tensors conflict when they live in the same storage and their byte ranges intersect
    (conservative: interleaved views such as ``x[::2]`` and ``x[1::2]`` count as overlapping).
    O(number of dims); no device work, no sync.
    """
    if torch.compiler.is_compiling():  # traced code: the registered op repeats this check when it runs
        return
    items = [(n, t) for n, t in tensors.items() if t is not None and t.numel() > 0]
    for i, (na, a) in enumerate(items):
        for nb, b in items[i + 1:]:
            if na not in written and nb not in written:
                continue
            if a.device != b.device:
                continue
            if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
                continue
            (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
            if alo < bhi and blo < ahi:
                raise ValueError(f"{na} and {nb} share memory; an in-place op needs {na if na in written else nb} "
                                 f"to have its own storage (pass .clone())")


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Groups:
    """Class membership in CSR form, the layout every backend kernel takes.

    Row ``j`` of the class-sorted order is input row ``perm[j]`` (``perm`` is
    ``None`` when rows are already class-contiguous); class ``k`` owns sorted
    rows ``offsets[k] .. offsets[k+1]-1``. ``counts`` are the group sizes on
    the host, used for checks only (``None`` for meta tensors).
    """

    perm: Optional[Tensor]
    offsets: Tensor
    counts: Optional[tuple[int, ...]]  # None on the meta device

    @property
    def num_groups(self) -> int:
        return self.offsets.shape[0] - 1


#: ``local_covariance`` returns zeros for empty groups, so its K may exceed the number of rows, up
#: to ``max(N, MAX_SPARSE_GROUPS)`` (ImageNet-21k's 21,841 classes fit). A larger K (inferred from
#: one stray label, or a huge ``num_groups``) is refused before anything of size K is allocated:
#: compact the labels or pass fewer rows' worth of classes. Losses need every group non-empty, so
#: their K is at most the number of rows on each side.
MAX_SPARSE_GROUPS = 2**16


def _infer_k(name: str, groups: GroupsArg, num_groups: Optional[int]) -> Optional[int]:
    if isinstance(groups, Tensor):
        return num_groups
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"{name} must be an int K or a 1-D integer label tensor, got {type(groups).__name__}")
    k = int(groups)
    if k <= 0:
        raise ValueError(f"{name} must be a positive number of groups, got {k}")
    if num_groups is not None and num_groups != k:
        raise ValueError(f"num_groups={num_groups} disagrees with {name}={k}")
    return k


def _check_labels(name: str, labels: Tensor, n: int, device: torch.device) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} labels must have shape (N,) = ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on the same device as the features ({device}), got {labels.device}")


def _check_k(name: str, k: int, k_max: int, n: int, inferred: bool) -> None:
    if k <= k_max:
        return
    how = f"max label + 1 = {k}" if inferred else f"num_groups={k}"
    raise ValueError(f"{name}: {how} groups is more than {k_max} allowed for N={n} rows "
                     f"({'every group of a loss needs a row' if k_max == n else 'see MAX_SPARSE_GROUPS'}); "
                     "compact the labels or pass num_groups")


def _counts(labels: Tensor, k: int) -> Tensor:
    """Group sizes (K,) of labels already in [0, K): no host sync (unlike bincount on CUDA)."""
    return torch.zeros(k, dtype=torch.int64, device=labels.device).index_add_(0, labels, torch.ones_like(labels))


def _build(name: str, groups: GroupsArg, n: int, k: Optional[int], device: torch.device, k_max: int) -> Groups:
    """CSR form of ``groups``; ``k=None`` infers K = max label + 1.

    Label tensors cost one host sync when K is known, two when it is inferred (the bound on K is
    checked between them, before anything of size K exists). On the meta device nothing is read:
    K must be given and the CSR tensors are meta tensors of the right shapes.
    """
    if isinstance(groups, int):
        _check_k(name, groups, max(k_max, 1), n, False)
        if n % groups != 0:
            raise ValueError(f"{name}={groups} must divide the number of rows N={n}")
        ipc = n // groups
        offsets = torch.arange(groups + 1, device=device, dtype=torch.int64) * ipc
        return Groups(None, offsets, (ipc,) * groups)
    if k is not None:
        _check_k(name, k, max(k_max, 1), n, False)
    labels = groups.to(torch.int64)
    if labels.device.type == "meta":
        if k is None:
            raise ValueError(f"{name}: labels on the meta device carry no values; pass num_groups")
        return Groups(torch.empty(n, dtype=torch.int64, device=device),
                      torch.empty(k + 1, dtype=torch.int64, device=device), None)
    if n == 0:
        k = k or 1
        return Groups(None, torch.zeros(k + 1, device=device, dtype=torch.int64), (0,) * k)
    in_order = (labels[1:] >= labels[:-1]).all().view(1)  # a stable sort would leave the rows where they are
    lo_hi = torch.stack(torch.aminmax(labels))
    if k is None:
        lo, hi, in_order_h = torch.cat([lo_hi, in_order.long()]).tolist()
        if lo < 0:
            raise ValueError(f"{name} labels must be >= 0, got values in [{lo}, {hi}]")
        k = hi + 1
        _check_k(name, k, max(k_max, 1), n, True)
        counts = _counts(labels, k)
        counts_h = counts.tolist()
    else:
        counts = _counts(labels.clamp(0, k - 1), k)
        host = torch.cat([lo_hi, in_order.long(), counts]).tolist()
        lo, hi, in_order_h, counts_h = host[0], host[1], host[2], host[3:]
    if lo < 0 or hi >= k:
        raise ValueError(f"{name} labels must lie in [0, {k}), got values in [{lo}, {hi}]")
    offsets = torch.zeros(k + 1, device=device, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    perm = None if in_order_h else torch.sort(labels, stable=True).indices  # None: kernels skip the gather
    return Groups(perm, offsets, tuple(counts_h))


def _check_num_groups(num_groups: Optional[int]) -> Optional[int]:
    if num_groups is None:
        return None
    if isinstance(num_groups, (bool, np.bool_)) or not isinstance(num_groups, numbers.Integral) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")
    return int(num_groups)


def resolve_groups(groups: GroupsArg, n: int, device: torch.device, num_groups: Optional[int] = None,
                   name: str = "groups", k_max: Optional[int] = None) -> Groups:
    """Normalise a ``groups`` argument (int K or N labels) for ``n`` rows on ``device``.

    ``k_max`` bounds K (default ``max(n, MAX_SPARSE_GROUPS)``, the rule of ops that allow empty
    groups); losses pass ``n``.
    """
    num_groups = _check_num_groups(num_groups)
    k = _infer_k(name, groups, num_groups)
    if isinstance(groups, Tensor):
        _check_labels(name, groups, n, device)
    else:
        groups = k  # numpy ints become int
    return _build(name, groups, n, k, device, max(n, MAX_SPARSE_GROUPS) if k_max is None else k_max)


def resolve_group_pair(syn_groups: GroupsArg, real_groups: GroupsArg, n_syn: int, n_real: int,
                       device: torch.device, num_groups: Optional[int],
                       real_device: Optional[torch.device] = None) -> tuple[Groups, Groups]:
    """Normalise the two sides of a matching loss to the same K; raise on any empty group.

    ``device`` is the syn side's, ``real_device`` the real side's (default: the same)."""
    real_device = device if real_device is None else real_device
    num_groups = _check_num_groups(num_groups)
    ks = _infer_k("syn_groups", syn_groups, num_groups)
    kr = _infer_k("real_groups", real_groups, num_groups)
    if ks is not None and kr is not None and ks != kr:
        raise ValueError(f"syn_groups has {ks} groups but real_groups has {kr}; they must agree")
    for name, g, n, dev in (("syn_groups", syn_groups, n_syn, device), ("real_groups", real_groups, n_real, real_device)):
        if isinstance(g, Tensor):
            _check_labels(name, g, n, dev)
    syn_groups = syn_groups if isinstance(syn_groups, Tensor) else ks
    real_groups = real_groups if isinstance(real_groups, Tensor) else kr
    k = ks if ks is not None else kr
    k_max = min(n_syn, n_real)
    if k is None:  # both label tensors, no num_groups: K = max label + 1 over both sides
        if syn_groups.device.type == "meta":
            raise ValueError("syn_groups: labels on the meta device carry no values; pass num_groups")
        hi = torch.stack([syn_groups.max(), real_groups.max().to(syn_groups.device)]).tolist() if n_syn and n_real else [0]
        k = max(1, max(hi) + 1)
        for name, n in (("syn_groups", n_syn), ("real_groups", n_real)):
            _check_k(name, k, n, n, True)
    gs = _build("syn_groups", syn_groups, n_syn, k, device, n_syn)
    gr = _build("real_groups", real_groups, n_real, k, real_device, n_real)
    require_nonempty(gs, "syn")
    require_nonempty(gr, "real")
    return gs, gr


def require_nonempty(g: Groups, side: str) -> None:
    """Every group has a row (not checkable on the meta device, where ``counts`` is None)."""
    for k, c in enumerate(g.counts or ()):
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


# --------------------------------------------------------------------------- registered-op arguments
#
# The registered ops (``torch.ops.edfkern.*``) can be called directly, with CSR tensors the public
# functions never built. Every argument that indexes memory is checked there, in O(K + N) and,
# on CUDA, with no host sync: value checks become device-side asserts (``torch._assert_async``).


def check_tensor_arg(op: str, name: str, t: object, *, dims: Optional[Sequence[int]] = None,
                     dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
                     device: Optional[torch.device] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{op}: {name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")
    return t


def _require(op: str, cond: Tensor, msg: str) -> None:
    """``cond`` (a 0-d bool tensor) must hold: checked on the host for CPU tensors, asynchronously on
    the device otherwise (a failure there is a device-side assert naming ``msg``)."""
    if cond.device.type == "meta":
        return
    if cond.device.type == "cpu":
        if not bool(cond):
            raise ValueError(f"{op}: {msg}")
    else:
        torch._assert_async(cond, f"{op}: {msg}")


def check_csr(op: str, n: int, perm: Optional[Tensor], offsets: Tensor, device: torch.device,
              side: str = "", nonempty: bool = False) -> int:
    """``offsets`` (K+1,) int64 from 0, non-decreasing, ending at ``n``; ``perm`` None or an int64
    permutation of ``range(n)``; with ``nonempty`` (the losses) every group has a row. Returns K."""
    p = f"{side}perm" if side else "perm"
    o = f"{side}offsets" if side else "offsets"
    check_tensor_arg(op, o, offsets, dims=(1,), dtypes=(torch.int64,), device=device)
    if not offsets.is_contiguous() or (perm is not None and isinstance(perm, Tensor) and not perm.is_contiguous()):
        raise ValueError(f"{op}: {o} and {p} must be contiguous")
    if offsets.shape[0] < 1 or (n > 0 and offsets.shape[0] < 2):
        raise ValueError(f"{op}: {o} must have K+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    k = offsets.shape[0] - 1
    if k > max(n, MAX_SPARSE_GROUPS):
        raise ValueError(f"{op}: {o} describes K={k} groups, more than max(N={n}, {MAX_SPARSE_GROUPS})")
    ok = (offsets[0] == 0) & (offsets[-1] == n)
    if k > 0:
        ok = ok & (offsets[1:] >= offsets[:-1]).all()
    _require(op, ok, f"{o} must start at 0, never decrease and end at N={n}")
    if nonempty and k > 0:
        _require(op, (offsets[1:] > offsets[:-1]).all(),
                 f"{o} has an empty group; every group of a loss needs at least one row")
    if perm is not None:
        check_tensor_arg(op, p, perm, dims=(1,), dtypes=(torch.int64,), device=device)
        if perm.shape[0] != n:
            raise ValueError(f"{op}: {p} must have shape (N,) = ({n},), got {tuple(perm.shape)}")
        if n > 0:
            in_range = (perm >= 0).all() & (perm < n).all()
            seen = torch.zeros(n, dtype=torch.int32, device=perm.device).index_add_(
                0, perm.clamp(0, n - 1), torch.ones(n, dtype=torch.int32, device=perm.device))
            _require(op, in_range & (seen == 1).all(), f"{p} must be a permutation of range(N={n})")
    return k


def check_rows_csr(op: str, name: str, x: object, ndim: int, perm: Optional[Tensor], offsets: Tensor,
                   side: str = "", nonempty: bool = False) -> int:
    """A float ``ndim``-D tensor of N rows and its CSR groups (``side`` prefixes perm/offsets); returns K."""
    check_tensor_arg(op, name, x, dims=(ndim,))
    return check_csr(op, x.shape[0], perm, offsets, x.device, side=f"{side}_" if side else "", nonempty=nonempty)


def check_shape_arg(op: str, name: str, t: Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_pair_tensors(syn: Tensor, real: Tensor, feature: str) -> None:
    """The two sides of a matching loss: the same per-row shape (``feature`` names it), dtype and device."""
    if syn.shape[1:] != real.shape[1:]:
        raise ValueError(f"real must have the same {feature} as syn {tuple(syn.shape[1:])}, got {tuple(real.shape[1:])}")
    check_same_dtype(syn=syn, real=real)
    check_same_device(syn=syn, real=real)


def matching_args(as_rows_of, syn: object, real: object, syn_groups: GroupsArg, real_groups: GroupsArg,
                  num_groups: Optional[int], weight: object) -> tuple[Tensor, Tensor, float, Groups, Groups]:
    """The two-sided losses' Python-level arguments: both sides in their row layout (``as_rows_of``:
    :func:`as_ncl` or :func:`as_rows`), ``weight`` as a float, both sides' groups with one K."""
    syn, real = as_rows_of("syn", syn), as_rows_of("real", real)
    weight = check_number("weight", weight)
    gs, gr = resolve_group_pair(syn_groups, real_groups, syn.shape[0], real.shape[0], syn.device, num_groups,
                                real_device=real.device)
    return syn, real, weight, gs, gr


def check_sgd_args(lr: float, momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool) -> tuple[float, float, float, float]:
    """torch.optim.SGD's hyper-parameter rules, shared by ``dae_sgd_step_`` and ``DAESGD``."""
    lr = check_number("lr", lr, lo=0.0)
    momentum = check_number("momentum", momentum, lo=0.0)
    dampening = check_number("dampening", dampening)
    weight_decay = check_number("weight_decay", weight_decay, lo=0.0)
    nesterov = check_bool("nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    return lr, momentum, dampening, weight_decay
