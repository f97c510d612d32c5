"""One table of cases per op, in the spirit of PyTorch's ``OpInfo`` and torchvision's ``RoIOpTester``.

Each public op of edfkern has one :class:`OpInfo` entry in :data:`OPS`: its registered
``torch.ops.edfkern`` op(s), the contract kernels of ``edfkern.reference.__all__`` it runs, its loop
oracle in ``edfkern.baselines``, and its cases:

- ``sample``: one call, forward and backward, at a tiny size (``test_dispatch.py``: it reaches
  exactly the entry's ``kernels``, on the selected backend);
- ``opcheck``: arguments of the registered op(s) for ``torch.library.opcheck`` (``test_registration.py``);
- ``bad``: bad calls of the registered op(s), given ``o = torch.ops.edfkern``; ``bad_native``: bad
  calls of its kernels in ``edfkern._C``, called directly; each must raise edfkern's ``ValueError`` or
  ``TypeError``, never crash (``test_adversarial.py``, in a subprocess);
- ``aliasing``: in-place calls whose outputs share memory, with the argument names the ``ValueError``
  must mention; ``labels``: stray labels and huge ``num_groups`` that must be refused before anything of
  size K is allocated; ``scalars``: scalar and size arguments with the exception type (or ``None``:
  accepted); ``tiny``: N=1, C=1, h=w=1, P=1 shapes, native against reference (``test_adversarial.py``);
- ``special``: where NaN / inf go and the parameters of the special-value tests (``test_special_values.py``);
- ``kernel_calls``: calls of its contract kernels, judged by the tolerance rule against
  ``edfkern.reference``; ``contract``: shapes and configurations of its kernels' own contract tests
  (``test_kernel_contract.py``).

Case builders are functions, called when a test collects or runs them, so every run gets fresh
tensors; random data come from seeded generators (:func:`srand`). The tests that read the table hold
the assertions (one rule per class of misbehaviour); an op's own accuracy tests stay in its family
file, ``tests/test_<family>.py``.

The table uses the public API, the registered ops, ``edfkern.reference``, ``edfkern.baselines`` and
(for ``bad_native``) ``edfkern._C``, nothing private of ``edfkern.ops`` or ``edfkern.distributed``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

import edfkern
import edfkern.reference as R
from edfkern import baselines as B
from edfkern.optim import DAESGD
from tests._utils import rand

Thunk = Callable[[], Any]
Case = tuple[str, Thunk]  # (label, a call that must raise, or, for scalars, be accepted)
# an aliasing case: builder() -> (a call that must raise ValueError, tensors that must stay unwritten,
# argument names the error must mention)
AliasCase = tuple[str, Callable[[], tuple[Thunk, tuple, tuple[str, ...]]]]
ScalarCase = tuple[str, Thunk, Optional[type]]  # (label, call, expected exception type or None = accepted)
TinyCase = tuple[str, Callable[[torch.dtype], list]]  # (id, run(dtype) -> outputs to compare)
# (label, contract kernel, CPU arguments): every output must match edfkern.reference's by the tolerance rule
# (floating) or exactly (integer, bool)
KernelCall = tuple[str, str, tuple]


def _none(*_args) -> list:
    return []


def _no_opcheck(device, gen) -> dict:
    return {}


@dataclass(frozen=True)
class OpInfo:
    """Everything the cross-op tests need to know about one public op (see the module docstring)."""
    name: str
    family: str  # its own tests: tests/test_<family>.py
    registered: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    baseline: Optional[Callable] = None  # the loop formulation in edfkern.baselines: test_special_values' oracle
    sample: Optional[Callable[[torch.Generator], None]] = None
    opcheck: Callable[[str, torch.Generator], dict[str, tuple]] = _no_opcheck
    bad: Callable[[Any], list[Case]] = _none
    bad_native: Callable[[Any], list[Case]] = _none
    aliasing: Callable[[], list[AliasCase]] = _none
    labels: Callable[[], list[Case]] = _none
    scalars: Callable[[], list[ScalarCase]] = _none
    tiny: Callable[[], list[TinyCase]] = _none
    special: dict[str, Any] = field(default_factory=dict)
    kernel_calls: Callable[[torch.dtype], list[KernelCall]] = _none
    contract: dict[str, Any] = field(default_factory=dict)


# ============================================================================ data helpers


def srand(*shape, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Standard normal data from a fresh generator seeded ``seed``, drawn in float64 and rounded once to ``dtype``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def csr(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, offsets)``: the CSR form of integer labels in ``[0, k)`` the registered ops and kernels take."""
    perm = torch.sort(labels, stable=True).indices
    offsets = torch.zeros(k + 1, dtype=torch.int64, device=labels.device)
    offsets[1:] = torch.bincount(labels, minlength=k).cumsum(0)
    return perm, offsets


def equal_offsets(n: int, k: int, device="cpu") -> torch.Tensor:
    """Offsets of ``k`` contiguous groups of ``n // k`` rows."""
    return torch.arange(k + 1, device=device) * (n // k)


INF, NAN = float("inf"), float("nan")
NEG_NAN = -float("nan")  # sign bit set: x86's default NaN, what 0 * inf and inf - inf give
SPECIALS = {"nan": [NAN], "negnan": [NEG_NAN], "inf": [INF], "-inf": [-INF], "mix": [NAN, NEG_NAN, INF, -INF]}


def sprinkle(x: torch.Tensor, values: list[float], gen: torch.Generator, frac: float) -> torch.Tensor:
    """A copy of x with about ``frac`` of its entries (at least one) replaced by the given special values."""
    x = x.clone()
    flat = x.view(-1)
    n = max(1, int(frac * flat.numel()))
    idx = torch.randperm(flat.numel(), generator=gen)[:n]
    v = torch.tensor(values, dtype=torch.float64)[torch.randint(len(values), (n,), generator=gen)]
    flat[idx] = v.to(x.dtype)
    return x


def nan_payloads(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """n NaNs of both signs and random payloads, in dtype."""
    bits = {torch.float64: (torch.int64, 52, 11), torch.float32: (torch.int32, 23, 8),
            torch.float16: (torch.int16, 10, 5), torch.bfloat16: (torch.int16, 7, 8)}[dtype]
    itype, mant, expo = bits
    payload = torch.randint(1, 2 ** min(mant, 30), (n,), generator=gen, dtype=torch.int64)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)
    word = (sign << (mant + expo)) | (((1 << expo) - 1) << mant) | payload
    if itype != torch.int64:  # reinterpret the low bits as a signed integer of that width
        width = mant + expo + 1
        word = torch.where(word >= 2 ** (width - 1), word - 2 ** width, word)
    out = word.to(itype).view(dtype)
    assert out.isnan().all()
    return out


def flat_rule_mask(c: torch.Tensor, acc: torch.dtype, H: int, W: int, beta: float, threshold) -> torch.Tensor:
    """dae_mask's rule for a flat map of value c (0-d, already in the CAM's dtype): U == c and tau == c
    exactly, so the mask is ``c + beta`` (or 1 below a fixed threshold) everywhere, computed in ``acc``."""
    cv = c.to(acc)
    tau = cv if threshold is None else torch.tensor(threshold, dtype=torch.float64).to(acc)
    val = cv + torch.tensor(beta, dtype=torch.float64).to(acc) if bool(cv >= tau) else torch.ones((), dtype=acc)
    return val.expand(1, 1, H, W)


def _detached(out: list) -> list:
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in out]


# ============================================================================ the label-group battery
#
# Every op that takes label groups in CSR form (perm, offsets) gets every bad offsets and every bad
# perm; ``call(perm, offsets)`` is the op with everything else valid.

CSR_N = 10  # rows of the battery's features


def csr_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (10, 3, 4), x2 (10, 6), offsets of 2 groups)``: valid arguments around the bad ones."""
    return srand(CSR_N, 3, 4, seed=0), srand(CSR_N, 6, seed=1), torch.tensor([0, 4, 10])


def _bad_offsets() -> dict[str, torch.Tensor]:
    return {
        "off-10M": torch.tensor([0, 10_000_000]), "off-neg": torch.tensor([0, -5, 10]),
        "off-short-end": torch.tensor([0, 5]), "off-start1": torch.tensor([1, 10]),
        "off-decreasing": torch.tensor([0, 7, 3, 10]), "off-float": torch.tensor([0.0, 10.0]),
        "off-2d": torch.tensor([[0, 10]]), "off-int32": torch.tensor([0, 10], dtype=torch.int32),
        "off-empty": torch.tensor([], dtype=torch.int64), "off-huge-K": torch.zeros(2**17, dtype=torch.int64),
    }


def _bad_perms() -> dict[str, torch.Tensor]:
    N = CSR_N
    return {
        "perm-oob": torch.tensor(list(range(N - 1)) + [N + 100]), "perm-neg": torch.tensor([-1] + list(range(1, N))),
        "perm-dup": torch.tensor([0] * N), "perm-short": torch.arange(N - 2), "perm-float": torch.arange(N).double(),
        "perm-int32": torch.arange(N, dtype=torch.int32), "perm-huge": torch.full((N,), 2**40),
    }


def csr_battery(name: str, call: Callable[[Optional[torch.Tensor], torch.Tensor], Any]) -> list[Case]:
    """``name-<bad>`` cases: ``call`` with each bad offsets (no perm), then each bad perm (good offsets)."""
    good = csr_data()[2]
    return ([(f"{name}-{lab}", lambda off=off: call(None, off)) for lab, off in _bad_offsets().items()]
            + [(f"{name}-{lab}", lambda p=p: call(p, good)) for lab, p in _bad_perms().items()])


def _native_fake(fn: Thunk) -> Thunk:
    """``fn`` run under a FakeTensorMode (a native function must refuse the fake tensors it creates)."""
    def run():
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            fn()
    return run


def native_functions():
    """``edfkern._C`` (built if needed), whose functions take the contract's arguments."""
    importlib.import_module("edfkern.native")
    return importlib.import_module("edfkern._C")


# ============================================================================ DAE: dae_mask, dae_, dae_sgd_step_

ALIAS_SHAPE = (3, 2, 5, 4)  # N, C, H, W of the aliasing cases


def _dae_battery_data():
    """(grad, cam, param, buf): valid DAE arguments around the bad ones."""
    return srand(4, 2, 6, 5, seed=2), srand(4, 3, 3, seed=3).abs(), srand(4, 2, 6, 5, seed=4), srand(4, 2, 6, 5, seed=5)


def _scalar_data():
    """(cam, grad) of the scalar cases."""
    return srand(2, 3, 3, seed=0).abs(), srand(2, 3, 6, 6, seed=1)


# ----------------------------------------------------------------------------- dae_mask


def _dae_mask_sample(g: torch.Generator) -> None:
    edfkern.dae_mask(torch.rand(2, 3, 3, generator=g), beta=1.0, size=(5, 4))


def _dae_mask_opcheck(device, gen):
    return {"dae_mask": (torch.ops.edfkern.dae_mask.default,
                         (torch.rand(3, 4, 4, generator=gen).to(device), 1.0, None, 7, 9))}


def _dae_mask_bad(o) -> list[Case]:
    cam = _dae_battery_data()[1]
    return [
        ("dae_mask-H0", lambda: o.dae_mask(cam, 1.0, None, 0, 5)),
        ("dae_mask-Hneg", lambda: o.dae_mask(cam, 1.0, None, -3, 5)),
        ("dae_mask-huge", lambda: o.dae_mask(cam, 1.0, None, 2**31, 2**31)),
        ("dae_mask-cam-empty", lambda: o.dae_mask(srand(4, 0, 3), 1.0, None, 4, 4)),
    ]


def _dae_mask_bad_native(o) -> list[Case]:
    cam = _dae_battery_data()[1]
    return _dae_mask_bad(o) + [("types-H-float", lambda: o.dae_mask(cam, 1.0, None, 4.0, 4))]


def _dae_mask_scalars() -> list[ScalarCase]:
    cam = _scalar_data()[0]
    m = edfkern.dae_mask
    return [
        ("mask-size-2**40", lambda: m(cam, beta=1.0, size=(2**40, 2**40)), ValueError),
        ("mask-size-numel", lambda: m(cam, beta=1.0, size=(2**21, 2**20)), ValueError),
        ("mask-size-float", lambda: m(cam, beta=1.0, size=(1.5, 3)), ValueError),
        ("mask-size-bool", lambda: m(cam, beta=1.0, size=(True, 3)), ValueError),
        ("mask-size-np-int", lambda: m(cam, beta=1.0, size=(np.int64(5), np.int32(4))), None),
        ("mask-beta-10**400", lambda: m(cam, beta=10**400), ValueError),
        ("mask-beta-nan", lambda: m(cam, beta=float("nan")), ValueError),
        ("mask-beta-str", lambda: m(cam, beta="1"), TypeError),
        ("mask-beta-bool", lambda: m(cam, beta=True), TypeError),
        ("mask-beta-tensor", lambda: m(cam, beta=torch.tensor(1.0)), TypeError),
        ("mask-beta-np32", lambda: m(cam, beta=np.float32(1.0)), None),
        ("mask-beta-np64", lambda: m(cam, beta=np.float64(1.0)), None),
        ("mask-beta-npint", lambda: m(cam, beta=np.int32(2)), None),
        ("mask-threshold-10**400", lambda: m(cam, beta=1.0, threshold=10**400), ValueError),
        ("mask-threshold-np32", lambda: m(cam, beta=1.0, threshold=np.float32(0.3)), None),
    ]


DAE_TINY_SHAPES = ((1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 3, 5), (2, 1, 1, 2, 1, 1), (1, 3, 2, 1, 7, 1))  # N, C, h, w, H, W


def _dae_tiny(op: str, run: Callable) -> Callable[[], list[TinyCase]]:
    """Tiny cases of one DAE op: ``run(cam, grad, threshold, dtype, H, W) -> outputs`` at every tiny shape.
    A 1x1 map is flat (every pixel sits at its mean: the flat-CAM rule's business): a fixed threshold there."""
    def cases() -> list[TinyCase]:
        out = []
        for n, ch, h, w, H, W in DAE_TINY_SHAPES:
            def tiny(dtype, n=n, ch=ch, h=h, w=w, H=H, W=W):
                cam, g = srand(n, h, w, seed=1, dtype=dtype).abs(), srand(n, ch, H, W, seed=2, dtype=dtype)
                return _detached(run(cam, g, 0.5 if h * w == 1 else None, dtype, H, W))
            out.append((f"{op}-{n}x{ch}x{h}x{w}->{H}x{W}", tiny))
        return out
    return cases


def _dae_mask_tiny_run(cam, g, thr, dtype, H, W):
    return [edfkern.dae_mask(cam, beta=1.0, size=(H, W), threshold=thr)]


# The DAE kernels have no kernel_calls: a pixel within rounding of the threshold may flip between
# backends, so their contract tests (test_dae_mask_and_scale, test_dae_sgd_step) leave those pixels out.
DAE_MASK = OpInfo(
    name="dae_mask", family="dae", registered=("dae_mask",), kernels=("dae_mask",), baseline=B.create_soft_mask,
    sample=_dae_mask_sample, opcheck=_dae_mask_opcheck, bad=_dae_mask_bad, bad_native=_dae_mask_bad_native,
    scalars=_dae_mask_scalars, tiny=_dae_tiny("dae_mask", _dae_mask_tiny_run),
    special={
        "shapes": [(4, 5, 4, 5), (4, 5, 9, 7), (1, 1, 6, 6), (3, 1, 5, 4), (7, 6, 3, 4)],  # (h, w, H, W)
        "kinds": ["nan", "inf", "-inf", "mix"],
        "thresholds": {"mean": None, "fixed": 0.4},
        # flat CAMs (docs/special-values.md): map sizes, output sizes, values
        "flat_maps": [(1, 1), (1, 7), (5, 1), (4, 6), (7, 7)],
        "flat_sizes": ["same", (32, 32), (13, 9), (3, 2), (1, 1)],
        "flat_values": [0.0, -1.5, 0.1, 3.7, 1e-3, 0.7],
        "flat_agree": [(1, 1, 32, 32), (1, 5, 8, 8), (6, 1, 6, 1), (4, 4, 4, 4), (7, 7, 224, 224)],  # h, w, H, W
    },
    contract={
        # N, C, h, w, H, W; (40, 37) > one 1024-pixel block
        "shapes": [(3, 2, 4, 4, 33, 17), (2, 3, 5, 3, 5, 3), (1, 1, 3, 7, 16, 16), (2, 4, 1, 1, 7, 9),
                   (2, 3, 4, 4, 40, 37), (1, 7, 7, 7, 7, 7)],
        "thresholds": [None, 0.4],
    },
)

# ----------------------------------------------------------------------------- dae_


def _dae_sample(g: torch.Generator) -> None:
    edfkern.dae_(torch.randn(2, 2, 5, 4, generator=g), torch.rand(2, 3, 3, generator=g), beta=1.0)


def _dae_opcheck(device, gen):
    return {"dae_": (torch.ops.edfkern.dae_.default,
                     (rand(3, 2, 7, 9, gen=gen).to(device), torch.rand(3, 4, 4, generator=gen).to(device), 1.0, 0.3))}


def _dae_bad(o) -> list[Case]:
    g4, cam, _, _ = _dae_battery_data()
    return [
        ("dae_-cam-wrong-N", lambda: o.dae_(g4, srand(7, 3, 3), 1.0, None)),
        ("dae_-cam-N1", lambda: o.dae_(g4, srand(1, 3, 3), 1.0, None)),
        ("dae_-cam-2d", lambda: o.dae_(g4, srand(4, 3), 1.0, None)),
        ("dae_-cam-empty", lambda: o.dae_(g4, srand(4, 0, 3), 1.0, None)),
        ("dae_-grad-3d", lambda: o.dae_(srand(4, 6, 5), cam, 1.0, None)),
        ("dae_-grad-int", lambda: o.dae_(torch.zeros(4, 2, 6, 5, dtype=torch.int32), cam, 1.0, None)),
        ("dae_-cam-is-grad", lambda: o.dae_(g4, g4[:, 0], 1.0, None)),
    ]


def _dae_bad_native(o) -> list[Case]:
    g4, cam, _, _ = _dae_battery_data()
    return _dae_bad(o) + [
        ("types-beta-str", lambda: o.dae_(g4, cam, "1", None)),
        ("layout-cam-strided", lambda: o.dae_(g4, srand(4, 3, 6, seed=4)[..., ::2], 1.0, None)),
        ("device-cam-meta", lambda: o.dae_(g4, cam.to("meta"), 1.0, None)),
        ("fake-dae_", _native_fake(lambda: o.dae_(torch.empty(4, 2, 6, 5), torch.empty(4, 3, 3), 1.0, None))),
    ]


def _dae_aliasing() -> list[AliasCase]:
    N, Cc, H, W = ALIAS_SHAPE

    def dae_expanded_grad():
        base = srand(1, Cc, H, W, seed=11)
        return (lambda: edfkern.dae_(base.expand(N, Cc, H, W), srand(N, 2, 2, seed=12).abs(), beta=1.0)), \
            (base,), ("grad",)

    def dae_as_strided_grad():
        flat = srand(N * Cc * H * W, seed=13)
        g = flat.as_strided((N, Cc, H, W), (Cc * H * W, H * W, W - 1, 1))  # rows overlap by one element
        return (lambda: edfkern.dae_(g, srand(N, 2, 2, seed=14).abs(), beta=1.0)), (flat,), ("grad",)

    def dae_cam_inside_grad():
        g = srand(N, Cc, H, W, seed=15)
        return (lambda: edfkern.dae_(g, g[:, 0], beta=1.0)), (g,), ("grad", "cam")

    return [(f.__name__, f) for f in (dae_expanded_grad, dae_as_strided_grad, dae_cam_inside_grad)]


def _dae_scalars() -> list[ScalarCase]:
    cam, g = _scalar_data()
    return [("dae-beta-np-bool", lambda: edfkern.dae_(g.clone(), cam, beta=np.bool_(True)), TypeError)]


def _dae_tiny_run(cam, g, thr, dtype, H, W):
    return [edfkern.dae_(g.clone(), cam, beta=1.0, threshold=0.5)]


DAE_ = OpInfo(
    name="dae_", family="dae", registered=("dae_",), kernels=("dae_",), baseline=B.dae_,
    sample=_dae_sample, opcheck=_dae_opcheck, bad=_dae_bad, bad_native=_dae_bad_native, aliasing=_dae_aliasing,
    scalars=_dae_scalars, tiny=_dae_tiny("dae_", _dae_tiny_run),
    # where NaN / inf go in dae_ and dae_sgd_step_ (test_nan_inf_like_loop_dae_inplace), on DAE_MASK's shapes[:4]
    special={"wheres": ["cam", "grad", "param", "buf"], "kinds": ["negnan", "inf", "mix"]},
)

# ----------------------------------------------------------------------------- dae_sgd_step_

SGD_TAIL = (0.1, 1.0, None, 0.5, 0.0, 0.0, False, False, False)  # lr .. first_step of the registered op


def _dae_sgd_sample(g: torch.Generator) -> None:
    grad, param, buf = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    edfkern.dae_sgd_step_(param, grad, buf, torch.rand(2, 3, 3, generator=g), lr=0.1, beta=1.0)


def _dae_sgd_opcheck(device, gen):
    r = lambda *s: rand(*s, gen=gen).to(device)  # noqa: E731
    param, grad, buf = r(3, 2, 7, 9), r(3, 2, 7, 9), r(3, 2, 7, 9)
    cam = torch.rand(3, 4, 4, generator=gen).to(device)
    return {"dae_sgd_step_": (torch.ops.edfkern.dae_sgd_step_.default,
                              (param, grad, buf, cam, 10.0, 1.0, None, 0.5, 0.0, 0.0, False, False, False))}


def _dae_sgd_bad(o) -> list[Case]:
    g4, cam, p4, b4 = _dae_battery_data()
    return [
        ("dae_sgd_step_-cam-wrong-N", lambda: o.dae_sgd_step_(p4, g4, b4, srand(9, 3, 3), *SGD_TAIL)),
        ("dae_sgd_step_-grad-shape", lambda: o.dae_sgd_step_(p4, srand(4, 2, 6, 4), b4, cam, *SGD_TAIL)),
        ("dae_sgd_step_-buf-shape", lambda: o.dae_sgd_step_(p4, g4, srand(4, 2, 6, 4), cam, *SGD_TAIL)),
        ("dae_sgd_step_-buf-none", lambda: o.dae_sgd_step_(p4, g4, None, cam, *SGD_TAIL)),
        ("dae_sgd_step_-buf-is-param", lambda: o.dae_sgd_step_(p4, g4, p4, cam, *SGD_TAIL)),
        ("dae_sgd_step_-grad-dtype", lambda: o.dae_sgd_step_(p4, g4.double(), b4, cam, *SGD_TAIL)),
    ]


def _dae_sgd_bad_native(o) -> list[Case]:
    g4, cam, _, _ = _dae_battery_data()
    return _dae_sgd_bad(o) + [
        ("types-nesterov-none", lambda: o.dae_sgd_step_(g4.clone(), g4, None, cam, 0.1, 1.0, None, 0.0, 0.0, 0.0,
                                                         None, False, False)),
    ]


def _dae_sgd_aliasing() -> list[AliasCase]:
    N, Cc, H, W = ALIAS_SHAPE

    def step(param, grad, buf, cam, momentum=0.5):
        return lambda: edfkern.dae_sgd_step_(param, grad, buf, cam, lr=0.1, beta=1.0, momentum=momentum)

    def fresh():
        return srand(N, Cc, H, W, seed=1), srand(N, Cc, H, W, seed=2), srand(N, Cc, H, W, seed=3), \
            srand(N, 2, 2, seed=4).abs()

    def buf_is_param():
        p, g, _, cam = fresh()
        return step(p, g, p, cam), (p, g, cam), ("param", "momentum_buffer")

    def grad_is_param():
        p, _, b, cam = fresh()
        return step(p, p, b, cam), (p, b, cam), ("param", "grad")

    def buf_is_grad():
        p, g, _, cam = fresh()
        return step(p, g, g, cam), (p, g, cam), ("grad", "momentum_buffer")

    def buf_view_of_param():
        p, g, _, cam = fresh()
        return step(p, g, p.view(N, Cc, H, W), cam), (p, g, cam), ("param", "momentum_buffer")

    def overlapping_slices():
        big = srand(2 * N + 1, Cc, H, W, seed=5)
        p, b = big[:N], big[N - 1:2 * N - 1]
        g, cam = srand(N, Cc, H, W, seed=6), srand(N, 2, 2, seed=7)
        return step(p, g, b, cam), (big, g, cam), ("param", "momentum_buffer")

    def cam_inside_param():
        p, g, b, _ = fresh()
        return step(p, g, b, p[:, 0, :2, :2]), (p, g, b), ("param", "cam")

    def cam_inside_buf():
        p, g, b, _ = fresh()
        return step(p, g, b, b[:, 1]), (p, g, b), ("momentum_buffer", "cam")

    def expanded_param():
        base = srand(1, Cc, H, W, seed=8)
        _, g, b, cam = fresh()
        return step(base.expand(N, Cc, H, W), g, b, cam), (base, g, b, cam), ("param",)

    def expanded_buf():
        p, g, _, cam = fresh()
        base = srand(N, Cc, H, 1, seed=9)
        return step(p, g, base.expand(N, Cc, H, W), cam), (p, g, base, cam), ("momentum_buffer",)

    def as_strided_param():
        flat = srand(N * Cc * H * W, seed=10)
        p = flat.as_strided((N, Cc, H, W), (Cc * H * W // 2, H * W, W, 1))  # images overlap by half
        _, g, b, cam = fresh()
        return step(p, g, b, cam), (flat, g, b, cam), ("param",)

    def registered_op_buf_is_param():
        p, g, _, cam = fresh()
        return (lambda: torch.ops.edfkern.dae_sgd_step_(p, g, p, cam, 0.1, 1.0, None, 0.5, 0.0, 0.0, False, False,
                                                        False)), (p, g, cam), ("param", "momentum_buffer")

    def daesgd_cam_view_of_param():
        p = srand(N, Cc, H, W, seed=16).requires_grad_()
        p.grad = srand(N, Cc, H, W, seed=17)
        opt = DAESGD([p], lr=0.1, momentum=0.5)
        cam = p.detach()[:, 0, :2, :2]
        return (lambda: opt.step(cams=cam)), (p, p.grad), ("param", "cam")

    return [(f.__name__, f) for f in (buf_is_param, grad_is_param, buf_is_grad, buf_view_of_param, overlapping_slices,
                                      cam_inside_param, cam_inside_buf, expanded_param, expanded_buf, as_strided_param,
                                      registered_op_buf_is_param, daesgd_cam_view_of_param)]


def _dae_sgd_scalars() -> list[ScalarCase]:
    cam, g = _scalar_data()

    def step(**kw):
        buf = kw.pop("momentum_buffer", torch.zeros_like(g))
        args = {"lr": 0.1, "beta": 1.0, "momentum": 0.5, **kw}
        return lambda: edfkern.dae_sgd_step_(g.clone(), g, buf, cam, **args)

    def daesgd(**kw):
        return lambda: DAESGD([g.clone().requires_grad_()], **kw)

    return [
        ("sgd-buf-junk", step(momentum=0, momentum_buffer="junk"), TypeError),
        ("sgd-buf-junk-momentum", step(momentum_buffer="junk"), TypeError),
        ("sgd-nesterov-str", step(nesterov="yes"), TypeError),
        ("sgd-maximize-int", step(maximize=1), TypeError),
        ("sgd-first-step-str", step(first_step="no"), TypeError),
        ("sgd-lr-10**400", step(lr=10**400), ValueError),
        ("sgd-lr-np32", step(lr=np.float32(0.1)), None),
        ("daesgd-lr-10**400", daesgd(lr=10**400), ValueError),
        ("daesgd-lr-np32", daesgd(lr=np.float32(0.1)), None),
        ("daesgd-beta-str", daesgd(lr=0.1, beta="x"), TypeError),
        ("daesgd-maximize-str", daesgd(lr=0.1, maximize="no"), TypeError),
    ]


def _dae_sgd_tiny_run(cam, g, thr, dtype, H, W):
    n, ch = g.shape[:2]
    p, b = g.clone() * 3, srand(n, ch, H, W, seed=3, dtype=dtype)
    edfkern.dae_sgd_step_(p, g, b, cam, lr=0.5, beta=2.0, momentum=0.9, nesterov=True, threshold=thr)
    p0 = g.clone()
    edfkern.dae_sgd_step_(p0, g, None, cam, lr=0.5, beta=1.0, momentum=0.0, weight_decay=0.1, threshold=thr)
    return [p, b, p0]


DAE_SGD_STEP_ = OpInfo(
    name="dae_sgd_step_", family="dae", registered=("dae_sgd_step_",), kernels=("dae_sgd_step_",),
    baseline=B.dae_sgd_step_, sample=_dae_sgd_sample, opcheck=_dae_sgd_opcheck, bad=_dae_sgd_bad,
    bad_native=_dae_sgd_bad_native, aliasing=_dae_sgd_aliasing, scalars=_dae_sgd_scalars,
    tiny=_dae_tiny("dae_sgd_step_", _dae_sgd_tiny_run),
    contract={
        "configs": [  # momentum, dampening, weight_decay, nesterov, maximize, first_step
            (0.5, 0.0, 0.0, False, False, False),
            (0.5, 0.0, 0.0, False, False, True),
            (0.9, 0.1, 0.01, False, True, False),
            (0.9, 0.0, 0.05, True, False, False),
            (0.0, 0.0, 0.1, False, False, False),
            (0.9, 0.3, 0.0, False, False, True),  # torch applies no dampening on the first step
        ],
    },
)

# ============================================================================ Grad-CAM


def _grad_cam_sample(g: torch.Generator) -> None:
    edfkern.grad_cam(torch.rand(2, 3, 3, 3, generator=g), torch.randn(2, 3, 3, 3, generator=g), size=(6, 6))


def _grad_cam_opcheck(device, gen):
    r = lambda *s: rand(*s, gen=gen).to(device)  # noqa: E731
    op = torch.ops.edfkern.grad_cam.default
    return {
        "grad_cam": (op, (r(3, 5, 4, 4), r(3, 5, 4, 4), None, "gradcam++", True, [8, 8])),
        "grad_cam_smooth": (op, (r(2, 3, 5, 4, 4), r(2, 3, 5, 4, 4), r(3, 5, 4, 4), "smoothgradcam++", True, None)),
    }


def _grad_cam_data():
    return srand(2, 3, 4, 5, seed=6), srand(2, 3, 4, 5, seed=7)


def _grad_cam_bad(o) -> list[Case]:
    A, G = _grad_cam_data()
    return [
        ("grad_cam-G-shape", lambda: o.grad_cam(A, G[:, :2], None, "gradcam", True, None)),
        ("grad_cam-method", lambda: o.grad_cam(A, G, None, "nope", True, None)),
        ("grad_cam-smooth-no-clean", lambda: o.grad_cam(A[None], G[None], None, "smoothgradcam++", True, None)),
        ("grad_cam-smooth-clean-shape", lambda: o.grad_cam(A[None], G[None], A[:1], "smoothgradcam++", True, None)),
        ("grad_cam-smooth-rank4", lambda: o.grad_cam(A, G, A, "smoothgradcam++", True, None)),
        ("grad_cam-size-neg", lambda: o.grad_cam(A, G, None, "gradcam", True, [-4, 5])),
        ("grad_cam-size-huge", lambda: o.grad_cam(A, G, None, "gradcam", True, [2**31, 2**31])),
        ("grad_cam-size-3", lambda: o.grad_cam(A, G, None, "gradcam", True, [4, 5, 6])),
        ("grad_cam-empty-hw", lambda: o.grad_cam(A[..., :0], G[..., :0], None, "gradcam", True, None)),
        ("grad_cam-dtypes", lambda: o.grad_cam(A, G.double(), None, "gradcam", True, None)),
    ]


def _grad_cam_bad_native(o) -> list[Case]:
    A, G = _grad_cam_data()
    return _grad_cam_bad(o) + [
        ("types-normalize-int", lambda: o.grad_cam(A, G, None, "gradcam", 1, None)),
        ("types-size-str", lambda: o.grad_cam(A, G, None, "gradcam", True, "ab")),
        ("types-method-bytes-nul", lambda: o.grad_cam(A, G, None, "gradcam\0x", True, None)),
    ]


def _grad_cam_scalars() -> list[ScalarCase]:
    A, G = srand(2, 3, 4, 4, seed=2), srand(2, 3, 4, 4, seed=3)
    c = edfkern.grad_cam
    return [
        ("cam-normalize-no", lambda: c(A, G, normalize="no"), TypeError),
        ("cam-normalize-int", lambda: c(A, G, normalize=1), TypeError),
        ("cam-normalize-np-bool", lambda: c(A, G, normalize=np.bool_(False)), None),
        ("cam-size-2**40", lambda: c(A, G, size=(2**40, 2**40)), ValueError),
        ("cam-method-list", lambda: c(A, G, method=["gradcam"]), ValueError),
    ]


def _grad_cam_tiny() -> list[TinyCase]:
    out = []
    for S, n, ch, h, w in ((1, 1, 1, 1, 1), (2, 1, 1, 1, 2)):
        def tiny(dtype, S=S, n=n, ch=ch, h=h, w=w):
            A, G = srand(n, ch, h, w, seed=1, dtype=dtype), srand(n, ch, h, w, seed=2, dtype=dtype)
            res = []
            for m in ("gradcam", "gradcam++"):
                res.append(edfkern.grad_cam(A, G, method=m))
                res.append(edfkern.grad_cam(A, G, method=m, size=(3, 1), normalize=False))
            As, Gs = srand(S, n, ch, h, w, seed=3, dtype=dtype), srand(S, n, ch, h, w, seed=4, dtype=dtype)
            res.append(edfkern.grad_cam(As, Gs, method="smoothgradcam++", clean_activations=A, size=(1, 2)))
            return _detached(res)
        out.append((f"grad_cam-S{S}N{n}C{ch}{h}x{w}", tiny))
    return out


def _grad_cam_kernel_calls(dtype) -> list[KernelCall]:
    A, G = srand(2, 5, 3, 4, seed=1, dtype=dtype).abs(), srand(2, 5, 3, 4, seed=2, dtype=dtype)
    return [("gradcam", "grad_cam", (A, G, None, "gradcam", True, None)),
            ("gradcam-size", "grad_cam", (A, G, None, "gradcam", False, [7, 5]))]


GRAD_CAM = OpInfo(
    name="grad_cam", family="gradcam", registered=("grad_cam",), kernels=("grad_cam",), baseline=B.grad_cam,
    sample=_grad_cam_sample, opcheck=_grad_cam_opcheck, bad=_grad_cam_bad, bad_native=_grad_cam_bad_native,
    scalars=_grad_cam_scalars, tiny=_grad_cam_tiny, kernel_calls=_grad_cam_kernel_calls,
    special={
        "cases": [  # (method, normalize, size, where, kind)
            ("gradcam", True, None, "A", "nan"), ("gradcam", True, None, "G", "negnan"),
            ("gradcam", False, None, "A", "inf"), ("gradcam", False, "same", "A", "inf"),
            ("gradcam", True, (9, 11), "A", "inf"), ("gradcam", False, (9, 11), "G", "mix"),
            ("gradcam++", True, None, "G", "nan"), ("gradcam++", False, None, "A", "-inf"),
            ("gradcam++", True, (7, 3), "A", "mix"), ("smoothgradcam++", True, None, "G", "nan"),
            ("smoothgradcam++", False, "same", "A", "inf"), ("smoothgradcam++", True, (9, 11), "A", "negnan"),
        ],
        "hw": [(5, 6), (4, 4)],  # 4x4: the native CPU kernel's vector path
    },
    contract={
        "methods": ["gradcam", "gradcam++", "smoothgradcam++"],
        "sizes": [None, (9, 13)],
        "hw": [(5, 3), (4, 4)],  # 4x4: the native CPU kernel's vector path
    },
)

# ============================================================================ CPD


def _cpd_data():
    return srand(20, seed=8), srand(20, seed=9), srand(20, seed=10)


def _cpd_sample(g: torch.Generator) -> None:
    s = torch.randn(30, generator=g, requires_grad=True)
    t, s0 = torch.randn(30, generator=g), torch.randn(30, generator=g)
    edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=0.3).backward()


def _cpd_opcheck(device, gen):
    s, t, s0 = (rand(40, dtype=torch.float64, gen=gen).to(device) for _ in range(3))
    return {"cpd_trajectory_loss": (torch.ops.edfkern.cpd_trajectory_loss.default, (s.requires_grad_(), t, s0, 0.25))}


def _cpd_bad(o) -> list[Case]:
    s, t, s0 = _cpd_data()
    one, tie = torch.tensor(1.0), torch.tensor(3)
    bwd = o.cpd_trajectory_loss_backward
    return [
        ("cpd_trajectory_loss-short-target", lambda: o.cpd_trajectory_loss(s, t[:7], s0, 0.25)),
        ("cpd_trajectory_loss-ratio5", lambda: o.cpd_trajectory_loss(s, t, s0, 5.0)),
        ("cpd_trajectory_loss-ratio-neg", lambda: o.cpd_trajectory_loss(s, t, s0, -1.0)),
        ("cpd_trajectory_loss-ratio-nan", lambda: o.cpd_trajectory_loss(s, t, s0, float("nan"))),
        ("cpd_trajectory_loss-empty", lambda: o.cpd_trajectory_loss(s[:0], t[:0], s0[:0], 0.25)),
        ("cpd_backward-short", lambda: bwd(one, s, t[:3], s0, one, tie, one)),
        ("cpd_backward-tie-float", lambda: bwd(one, s, t, s0, one, one, one)),
        ("cpd_backward-thr-vector", lambda: bwd(one, s, t, s0, s, tie, one)),
    ]


def _fake_tie(o, s):
    """A real call whose one fake argument is a 0-d tensor the kernel would read with item()."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        tie = mode.from_tensor(torch.tensor(3))
    one = torch.tensor(1.0)
    o.cpd_backward(one, s, s, s, one, tie, one)


def _cpd_bad_native(o) -> list[Case]:
    s, t, s0 = _cpd_data()
    one, tie = torch.tensor(1.0), torch.tensor(3)
    return [
        ("cpd_forward-short-target", lambda: o.cpd_forward(s, t[:7], s0, 5)),
        ("cpd_forward-k-neg", lambda: o.cpd_forward(s, t, s0, -1)),
        ("cpd_forward-k-P", lambda: o.cpd_forward(s, t, s0, 20)),
        ("cpd_forward-k-huge", lambda: o.cpd_forward(s, t, s0, 10**12)),
        ("cpd_forward-empty", lambda: o.cpd_forward(s[:0], t[:0], s0[:0], 0)),
        ("cpd_backward-short", lambda: o.cpd_backward(one, s, t[:3], s0, one, tie, one)),
        ("cpd_backward-tie-float", lambda: o.cpd_backward(one, s, t, s0, one, one, one)),
        ("cpd_backward-thr-vector", lambda: o.cpd_backward(one, s, t, s0, s, tie, one)),
        ("fake-cpd_forward", _native_fake(lambda: o.cpd_forward(torch.empty(20), torch.empty(20), torch.empty(20), 5))),
        ("fake-cpd_backward-tie", lambda: _fake_tie(o, s)),
    ]


def _cpd_scalars() -> list[ScalarCase]:
    s, t, s0 = srand(30, seed=4), srand(30, seed=5), srand(30, seed=6)
    loss = edfkern.cpd_trajectory_loss
    return [
        ("cpd-ratio-10**400", lambda: loss(s, t, s0, drop_ratio=10**400), ValueError),
        ("cpd-ratio-np32", lambda: loss(s, t, s0, drop_ratio=np.float32(0.25)), None),
    ]


CPD_TINY_P = (1, 2, 3)


def _cpd_tiny_inputs(p: int, dtype):
    return srand(p, seed=1, dtype=dtype).requires_grad_(), srand(p, seed=2, dtype=dtype), srand(p, seed=3, dtype=dtype)


def _cpd_tiny() -> list[TinyCase]:
    def tiny(dtype, p):
        s, t, s0 = _cpd_tiny_inputs(p, dtype)
        out = []
        for ratio in (0.0, 0.5):
            loss = edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=ratio)
            out += [loss, *torch.autograd.grad(loss, s)]
        return _detached(out)
    return [(f"cpd_trajectory_loss-P{p}", lambda dtype, p=p: tiny(dtype, p)) for p in CPD_TINY_P]


def _cpd_kernel_calls(dtype) -> list[KernelCall]:
    s, t, s0 = (srand(37, seed=i, dtype=dtype) for i in range(3))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, sd, thr, tie = R.cpd_forward(s, t, s0, 9)
    return [("forward", "cpd_forward", (s, t, s0, 9)),
            ("backward", "cpd_backward", (torch.tensor(0.5, dtype=acc), s, t, s0, thr, tie, sd))]


CPD_TRAJECTORY_LOSS = OpInfo(
    name="cpd_trajectory_loss", family="cpd", registered=("cpd_trajectory_loss", "cpd_trajectory_loss_backward"),
    kernels=("cpd_forward", "cpd_backward"), baseline=B.cpd_trajectory_loss, sample=_cpd_sample,
    opcheck=_cpd_opcheck, bad=_cpd_bad, bad_native=_cpd_bad_native, scalars=_cpd_scalars, tiny=_cpd_tiny,
    kernel_calls=_cpd_kernel_calls,
    special={
        "cases": [  # (where the special values go, kind, P, drop_ratio)
            ("student", "negnan", 50, 0.5), ("student", "nan", 7, 0.9), ("student", "inf", 40, 0.25),
            ("student", "mix", 33, 0.75), ("target", "-inf", 20, 0.5), ("start", "nan", 20, 0.5),
            ("start", "inf", 9, 0.0), ("s=t=inf", "inf - inf", 30, 0.6), ("s=t=inf", "inf - inf", 6, 0.9),
        ],
    },
    contract={"P": [1, 7, 2053, 6001], "modes": ["random", "ties"], "ratios": (0.0, 0.25, 0.5, 0.9)},
)


def _keep_mask_sample(g: torch.Generator) -> None:
    edfkern.cpd_keep_mask(torch.rand(30, generator=g), 0.3)


def _keep_mask_opcheck(device, gen):
    return {"cpd_keep_mask": (torch.ops.edfkern.cpd_keep_mask.default, (rand(50, gen=gen).to(device).abs(), 0.3))}


def _keep_mask_bad(o) -> list[Case]:
    s = _cpd_data()[0]
    return [
        ("cpd_keep_mask-ratio2", lambda: o.cpd_keep_mask(s, 2.0)),
        ("cpd_keep_mask-int", lambda: o.cpd_keep_mask(s.long(), 0.5)),
    ]


def _keep_mask_bad_native(o) -> list[Case]:
    s = _cpd_data()[0]
    return [
        ("cpd_keep_mask-k-huge", lambda: o.cpd_keep_mask(s, 10**12)),
        ("cpd_keep_mask-k-neg", lambda: o.cpd_keep_mask(s, -5)),
        ("types-k-float", lambda: o.cpd_keep_mask(s, 2.5)),
        ("types-k-huge", lambda: o.cpd_keep_mask(s, 2**70)),
    ]


def _keep_mask_scalars() -> list[ScalarCase]:
    return [("cpd-ratio-bool", lambda: edfkern.cpd_keep_mask(srand(30, seed=4), True), TypeError)]


def _keep_mask_tiny() -> list[TinyCase]:
    def tiny(dtype, p):
        s, t, _ = _cpd_tiny_inputs(p, dtype)
        return [edfkern.cpd_keep_mask((s - t).detach() ** 2, ratio) for ratio in (0.0, 0.5)]
    return [(f"cpd_keep_mask-P{p}", lambda dtype, p=p: tiny(dtype, p)) for p in CPD_TINY_P]


CPD_KEEP_MASK = OpInfo(
    name="cpd_keep_mask", family="cpd", registered=("cpd_keep_mask",), kernels=("cpd_keep_mask",),
    baseline=B.cpd_keep_mask, sample=_keep_mask_sample, opcheck=_keep_mask_opcheck, bad=_keep_mask_bad,
    bad_native=_keep_mask_bad_native, scalars=_keep_mask_scalars, tiny=_keep_mask_tiny,
    kernel_calls=lambda dtype: [("k=11", "cpd_keep_mask", (srand(29, seed=4, dtype=dtype).round(), 11))],
    special={"ratios": [0.1, 0.5, 0.8, 0.95], "P": (23, 64, 101, 7)},
    contract={"P": [1, 5, 2049, 4099], "modes": ["random", "ties"], "ratios": (0.0, 0.3, 0.5, 0.99)},
)

# ============================================================================ label groups: covariance and features

STRAY_LABELS = (2**27, 2**40, 2**62)  # one label of a valid set replaced by each
HUGE_GROUPS = (2**27, 2**40)  # num_groups / integer groups


def _label_data():
    """(x (12, 4, 3), feat (12, 5), labels 0..2, stray(v): the labels with one replaced by v)."""
    base = torch.arange(12) % 3

    def stray(v):
        lab = base.clone()
        lab[7] = v
        return lab
    return srand(12, 4, 3, seed=0), srand(12, 5, seed=1), base, stray


def _iid_tiny(op: str, run: Callable) -> Callable[[], list[TinyCase]]:
    """Tiny cases of one label-group op: ``run(x (N, C, L) requiring grad, k, dtype) -> outputs``."""
    def cases() -> list[TinyCase]:
        out = []
        for n, ch, l, k in ((1, 1, 1, 1), (2, 1, 1, 2), (3, 2, 1, 1), (1, 1, 5, 1)):
            def tiny(dtype, n=n, ch=ch, l=l, k=k):
                return _detached(run(srand(n, ch, l, seed=1, dtype=dtype).requires_grad_(), k))
            out.append((f"{op}-N{n}C{ch}L{l}K{k}", tiny))
        return out
    return cases


def _loss_and_grad(loss: torch.Tensor, x: torch.Tensor) -> list:
    return [loss, *torch.autograd.grad(loss, x)]


# ----------------------------------------------------------------------------- local_covariance


def _cov_sample(g: torch.Generator) -> None:
    x = torch.randn(6, 3, 4, generator=g, requires_grad=True)
    edfkern.local_covariance(x, groups=2).sum().backward()


def _cov_opcheck(device, gen):
    perm, offsets = csr(torch.tensor([1, 0, 2, 1, 0, 2], device=device), 3)
    return {"local_covariance": (torch.ops.edfkern.local_covariance.default,
                                 (rand(6, 4, 3, dtype=torch.float64, gen=gen).to(device).requires_grad_(), perm,
                                  offsets))}


def _cov_bad(o) -> list[Case]:
    x, x2, good = csr_data()
    Cc, L = x.shape[1:]
    mean, M = torch.zeros(2, Cc, L), torch.zeros(2, Cc, Cc)
    return (csr_battery("local_covariance", lambda p, off: o.local_covariance(x, p, off))
            + csr_battery("covariance_backward", lambda p, off: o.covariance_backward(x, p, off, mean, M)) + [
        ("local_covariance-x-2d", lambda: o.local_covariance(x2, None, good)),
        ("local_covariance-x-int", lambda: o.local_covariance(x.long(), None, good)),
        ("covariance_backward-mean-shape", lambda: o.covariance_backward(
            x, None, good, torch.zeros(1, Cc, L), torch.zeros(2, Cc, Cc))),
        ("covariance_backward-M-shape", lambda: o.covariance_backward(
            x, None, good, torch.zeros(2, Cc, L), torch.zeros(2, Cc + 1, Cc))),
    ])


def _cov_bad_native(o) -> list[Case]:
    x, x2, good = csr_data()
    Cc, L = x.shape[1:]
    return (csr_battery("cov_forward", lambda p, off: o.cov_forward(x, p, off))
            + csr_battery("cov_backward", lambda p, off: o.cov_backward(x, p, off, torch.zeros(2, Cc, L),
                                                                         torch.zeros(2, Cc, Cc))) + [
        ("cov_forward-x-2d", lambda: o.cov_forward(x2, None, good)),
        ("cov_forward-x-int", lambda: o.cov_forward(x.long(), None, good)),
        ("cov_backward-mean-shape", lambda: o.cov_backward(x, None, good, torch.zeros(1, Cc, L),
                                                           torch.zeros(2, Cc, Cc))),
        ("types-x-str", lambda: o.cov_forward("x", None, good)),
        ("types-too-few-args", lambda: o.cov_forward(x, None)),
        ("layout-x-transposed", lambda: o.cov_forward(x.transpose(1, 2), None, good)),
        ("device-x-meta", lambda: o.cov_forward(x.to("meta"), None, good.to("meta"))),
        ("fake-cov_forward", _native_fake(lambda: o.cov_forward(torch.empty(10, 3, 4), None,
                                                                torch.tensor([0, 4, 10])))),
    ])


def _cov_labels() -> list[Case]:
    x, _, base, stray = _label_data()
    cov = edfkern.local_covariance
    return ([(f"local_covariance-label{v}", lambda v=v: cov(x, groups=stray(v))) for v in STRAY_LABELS]
            + [c for k in HUGE_GROUPS for c in (
                (f"local_covariance-num_groups{k}", lambda k=k: cov(x, groups=base, num_groups=k)),
                (f"local_covariance-int{k}", lambda k=k: cov(x, groups=k)))])


def _cov_tiny_run(x, k):
    n = x.shape[0]
    cov = edfkern.local_covariance(x, groups=torch.arange(n) % k, num_groups=k)
    return [cov, *torch.autograd.grad(cov.sum() + (cov ** 2).sum(), x)]


def _kernel_groups() -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, offsets) of 9 shuffled rows in 3 groups, one of them empty."""
    return csr(torch.tensor([2, 0, 0, 2, 3, 0, 2, 3, 0]), 4)


def _cov_kernel_calls(dtype) -> list[KernelCall]:
    x = srand(9, 5, 3, seed=1, dtype=dtype) + 0.5
    perm, offsets = _kernel_groups()
    mean = R.cov_forward(x, perm, offsets)[1]
    return [("forward", "cov_forward", (x, perm, offsets)),
            ("backward", "cov_backward", (x, perm, offsets, mean, srand(4, 5, 5, seed=2, dtype=mean.dtype)))]


LOCAL_COVARIANCE = OpInfo(
    name="local_covariance", family="covariance", registered=("local_covariance", "covariance_backward"),
    kernels=("cov_forward", "cov_backward"), baseline=B.local_covariance, sample=_cov_sample, opcheck=_cov_opcheck,
    bad=_cov_bad, bad_native=_cov_bad_native, labels=_cov_labels, tiny=_iid_tiny("local_covariance", _cov_tiny_run),
    kernel_calls=_cov_kernel_calls,
    contract={
        "cases": [  # n, C, L, K, groups
            (12, 5, 3, 3, "equal"),
            (11, 20, 16, 4, "labels"),
            (7, 33, 1, 3, "labels"),
            (20, 5, 16, 2, "equal"),  # few classes, many columns: Triton's split-K path
            (11, 70, 5, 3, "labels"),  # C=70 > one 64-channel tile: 2x2 tiles
            (21, 1, 1, 5, "labels"),
        ],
        # L a multiple of 16: the native CPU kernel's vector path (see test_covariance_l_multiple_of_16)
        "l16_cases": [(200, 37, 32, 3, "labels"), (130, 128, 16, 2, "equal"), (40, 13, 16, 2, "labels"),
                      (9, 5, 48, 3, "labels")],
    },
)

# ----------------------------------------------------------------------------- covariance_matching_loss


def _cm_sample(g: torch.Generator) -> None:
    x = torch.randn(6, 3, 4, generator=g, requires_grad=True)
    edfkern.covariance_matching_loss(x, torch.randn(4, 3, 4, generator=g), syn_groups=2, real_groups=2).backward()


def _cm_opcheck(device, gen):
    perm, offsets = csr(torch.tensor([1, 0, 2, 1, 0, 2], device=device), 3)
    r = lambda *s: rand(*s, dtype=torch.float64, gen=gen).to(device)  # noqa: E731
    return {"covariance_matching_loss": (torch.ops.edfkern.covariance_matching_loss.default,
                                         (r(6, 4, 3).requires_grad_(), None, equal_offsets(6, 3, device),
                                          r(6, 4, 3), perm, offsets, 0.01))}


def _cm_bad(o) -> list[Case]:
    x, _, good = csr_data()
    return csr_battery("covariance_matching_loss",
                       lambda p, off: o.covariance_matching_loss(x, p, off, x, None, good, 1.0)) + [
        ("covariance_matching_loss-real-C", lambda: o.covariance_matching_loss(
            x, None, good, srand(CSR_N, x.shape[1] + 1, x.shape[2]), None, good, 1.0)),
    ]


def _cm_labels() -> list[Case]:
    x, _, base, stray = _label_data()
    cm = edfkern.covariance_matching_loss
    return [(f"cm-label{v}", lambda v=v: cm(x, x, syn_groups=stray(v), real_groups=base)) for v in STRAY_LABELS] + [
        ("cm-more-groups-than-rows", lambda: cm(x, x[:2], syn_groups=base, real_groups=torch.tensor([0, 2])))]


def _cm_scalars() -> list[ScalarCase]:
    x = srand(6, 2, 3, seed=7)
    return [("cov-weight-10**400", lambda: edfkern.covariance_matching_loss(x, x, syn_groups=2, real_groups=2,
                                                                            weight=10**400), ValueError)]


def _cm_tiny_run(x, k):
    if x.shape[0] % k or x.shape[0] < k:
        return []
    return _loss_and_grad(edfkern.covariance_matching_loss(x, x.detach() * 2, syn_groups=k, real_groups=k), x)


COVARIANCE_MATCHING_LOSS = OpInfo(
    name="covariance_matching_loss", family="covariance", registered=("covariance_matching_loss",),
    kernels=("cov_forward", "cov_backward"), baseline=B.covariance_matching_loss, sample=_cm_sample,
    opcheck=_cm_opcheck, bad=_cm_bad, labels=_cm_labels, scalars=_cm_scalars,
    tiny=_iid_tiny("covariance_matching_loss", _cm_tiny_run),
)

# ----------------------------------------------------------------------------- class_centralization_loss


def _cc_sample(g: torch.Generator) -> None:
    f = torch.randn(6, 5, generator=g, requires_grad=True)
    edfkern.class_centralization_loss(f, groups=2).backward()


def _cc_opcheck(device, gen):
    perm, offsets = csr(torch.tensor([1, 0, 2, 1, 0, 2], device=device), 3)
    return {"class_centralization_loss": (torch.ops.edfkern.class_centralization_loss.default,
                                          (rand(6, 5, dtype=torch.float64, gen=gen).to(device).requires_grad_(),
                                           perm, offsets, 0.05))}


def _cc_bad(o) -> list[Case]:
    _, x2, good = csr_data()
    one = torch.tensor(1.0)
    return (csr_battery("class_centralization_loss", lambda p, off: o.class_centralization_loss(x2, p, off, 1.0))
            + csr_battery("class_centralization_backward", lambda p, off: o.class_centralization_backward(
                one, x2, p, off, torch.zeros(2, 6), 1.0)) + [
        ("class_centralization_backward-mean", lambda: o.class_centralization_backward(
            one, x2, None, good, torch.zeros(1, 6), 1.0)),
    ])


def _cc_bad_native(o) -> list[Case]:
    _, x2, good = csr_data()
    one = torch.tensor(1.0)
    return (csr_battery("cc_forward", lambda p, off: o.cc_forward(x2, p, off))
            + csr_battery("cc_backward", lambda p, off: o.cc_backward(one, x2, p, off, torch.zeros(2, 6), 1.0)) + [
        ("cc_backward-mean-shape", lambda: o.cc_backward(one, x2, None, good, torch.zeros(5, 6), 1.0)),
        ("cc_backward-grad-shape", lambda: o.cc_backward(torch.ones(3), x2, None, good, torch.zeros(2, 6), 1.0)),
        ("types-perm-junk", lambda: o.cc_forward(x2, "perm", good)),
        ("device-perm-meta", lambda: o.cc_forward(x2, torch.arange(CSR_N, device="meta"), good)),
    ])


def _cc_labels() -> list[Case]:
    _, feat, base, stray = _label_data()
    cc = edfkern.class_centralization_loss
    return ([(f"cc-label{v}", lambda v=v: cc(feat, groups=stray(v))) for v in STRAY_LABELS]
            + [(f"cc-num_groups{k}", lambda k=k: cc(feat, groups=base, num_groups=k)) for k in HUGE_GROUPS]
            + [("cc-label-negative", lambda: cc(feat, groups=stray(-2**40)))])


def _cc_scalars() -> list[ScalarCase]:
    feat, lab = srand(6, 4, seed=8), torch.arange(6) % 2
    cc = edfkern.class_centralization_loss
    return [
        ("cc-weight-np32", lambda: cc(feat, groups=2, weight=np.float32(0.5)), None),
        ("cc-groups-np-int", lambda: cc(feat, groups=np.int64(2)), None),
        ("cc-groups-bool", lambda: cc(feat, groups=True), TypeError),
        ("cc-num-groups-float", lambda: cc(feat, groups=lab, num_groups=2.0), ValueError),
        ("cc-num-groups-np-int", lambda: cc(feat, groups=lab, num_groups=np.int64(2)), None),
    ]


def _cc_tiny_run(x, k):
    if x.shape[0] % k or x.shape[0] < k:
        return []
    return _loss_and_grad(edfkern.class_centralization_loss(x.reshape(x.shape[0], -1), groups=k), x)


def _cc_kernel_calls(dtype) -> list[KernelCall]:
    x = srand(9, 7, seed=1, dtype=dtype) + 1.0
    perm, offsets = _kernel_groups()
    mean = R.cc_forward(x, perm, offsets)[1]
    return [("forward", "cc_forward", (x, perm, offsets)),
            ("backward", "cc_backward", (torch.tensor(0.3, dtype=mean.dtype), x, perm, offsets, mean, 0.1))]


CLASS_CENTRALIZATION_LOSS = OpInfo(
    name="class_centralization_loss", family="features",
    registered=("class_centralization_loss", "class_centralization_backward"), kernels=("cc_forward", "cc_backward"),
    baseline=B.class_centralization_loss, sample=_cc_sample, opcheck=_cc_opcheck, bad=_cc_bad,
    bad_native=_cc_bad_native, labels=_cc_labels, scalars=_cc_scalars,
    tiny=_iid_tiny("class_centralization_loss", _cc_tiny_run), kernel_calls=_cc_kernel_calls,
    contract={"cases": [(12, 37, 3, "equal"), (13, 70, 5, "labels"), (6, 1, 3, "labels"),
                        (13, 300, 3, "labels"), (27, 13, 5, "labels")]},  # n, D, K, groups; D=300: > one tile
)

# ----------------------------------------------------------------------------- mean_matching_loss


def _mm_sample(g: torch.Generator) -> None:
    f = torch.randn(6, 5, generator=g, requires_grad=True)
    edfkern.mean_matching_loss(f, torch.randn(4, 5, generator=g), syn_groups=2, real_groups=2).backward()


def _mm_opcheck(device, gen):
    perm, offsets = csr(torch.tensor([1, 0, 2, 1, 0, 2], device=device), 3)
    r = lambda *s: rand(*s, dtype=torch.float64, gen=gen).to(device)  # noqa: E731
    return {"mean_matching_loss": (torch.ops.edfkern.mean_matching_loss.default,
                                   (r(6, 5).requires_grad_(), perm, offsets, r(9, 5), None,
                                    equal_offsets(9, 3, device), 1.0))}


def _mm_bad(o) -> list[Case]:
    _, x2, good = csr_data()
    one = torch.tensor(1.0)
    return (csr_battery("mean_matching_loss", lambda p, off: o.mean_matching_loss(x2, None, good, x2, p, off, 1.0))
            + csr_battery("mean_matching_backward", lambda p, off: o.mean_matching_backward(
                one, torch.zeros(2, 6), p, off, CSR_N, 1.0, torch.float32)) + [
        ("mean_matching_backward-n", lambda: o.mean_matching_backward(
            one, torch.zeros(2, 6), None, good, CSR_N + 5, 1.0, torch.float32)),
    ])


def _mm_bad_native(o) -> list[Case]:
    x, x2, good = csr_data()
    return csr_battery("seg_mean", lambda p, off: o.seg_mean(x2, p, off)) + [
        ("seg_mean-x-3d", lambda: o.seg_mean(x, None, good)),
        ("types-offsets-list", lambda: o.seg_mean(x2, None, [0, 4, 10])),
        ("layout-offsets-strided", lambda: o.seg_mean(x2, None, torch.tensor([0, 9, 4, 9, 10])[::2])),
        ("layout-x-sparse", lambda: o.seg_mean(x2.to_sparse(), None, good)),
        ("device-offsets-meta", lambda: o.seg_mean(x2, None, good.to("meta"))),
    ]


def _mm_labels() -> list[Case]:
    _, feat, base, stray = _label_data()
    mm = edfkern.mean_matching_loss
    return ([(f"mm-label{v}", lambda v=v: mm(feat, feat, syn_groups=base, real_groups=stray(v))) for v in STRAY_LABELS]
            + [(f"mm-num_groups{k}", lambda k=k: mm(feat, feat, syn_groups=base, real_groups=base, num_groups=k))
               for k in HUGE_GROUPS])


def _mm_tiny_run(x, k):
    if x.shape[0] % k or x.shape[0] < k:
        return []
    f = x.reshape(x.shape[0], -1)
    return _loss_and_grad(edfkern.mean_matching_loss(f, f.detach() * 2, syn_groups=k, real_groups=k), x)


MEAN_MATCHING_LOSS = OpInfo(
    name="mean_matching_loss", family="features", registered=("mean_matching_loss", "mean_matching_backward"),
    kernels=("seg_mean",), baseline=B.mean_matching_loss, sample=_mm_sample, opcheck=_mm_opcheck, bad=_mm_bad,
    bad_native=_mm_bad_native, labels=_mm_labels, tiny=_iid_tiny("mean_matching_loss", _mm_tiny_run),
    kernel_calls=lambda dtype: [("seg_mean", "seg_mean", (srand(9, 7, seed=1, dtype=dtype), *_kernel_groups()))],
)

# ============================================================================ trajectory matching

# Composed of autograd and the other ops: no registered op or kernel of its own; its cases are in
# tests/_trajectory_cases.py, its tests in tests/test_trajectory.py.
TRAJECTORY_MATCHING_LOSS = OpInfo(name="trajectory_matching_loss", family="trajectory",
                                  baseline=B.trajectory_matching_loop)

# ============================================================================ the table

OPS: list[OpInfo] = [DAE_MASK, DAE_, DAE_SGD_STEP_, GRAD_CAM, CPD_TRAJECTORY_LOSS, CPD_KEEP_MASK, LOCAL_COVARIANCE,
                     COVARIANCE_MATCHING_LOSS, CLASS_CENTRALIZATION_LOSS, MEAN_MATCHING_LOSS,
                     TRAJECTORY_MATCHING_LOSS]
OP = {op.name: op for op in OPS}


def cases(kind: str, *args) -> list:
    """Every op's cases of one kind (a field name of :class:`OpInfo`), in table order."""
    return [c for op in OPS for c in getattr(op, kind)(*args)]
