"""Assertion helpers shared by the op tests."""
from __future__ import annotations

from typing import Optional

import torch

# (dtype, rtol, atol) for results that accumulate in float32 (float64 for float64).
# Low-precision inputs are compared against an fp64 oracle computed on the *same rounded inputs*,
# so the only error left is fp32 accumulation, plus output rounding for in-place results.
ACC_TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
    torch.float16: (1e-4, 1e-5),
    torch.bfloat16: (1e-4, 1e-5),
}
# Results stored back in the input dtype (in-place ops, gradients): one rounding of that dtype,
# i.e. half an ulp (2^-11 for fp16, 2^-8 for bf16, relative); the tolerance is two of those, to
# allow a rounded intermediate (e.g. the stored momentum buffer feeding the parameter update).
STORE_TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# loose tolerances for the finite entries next to special values (rtol, atol)
FINITE_TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-6), torch.float16: (2e-2, 1e-3),
              torch.bfloat16: (5e-2, 1e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = "") -> None:
    """allclose with a report: mismatch count, first bad index, and the values there."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad |= a.isnan() != e.isnan()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol}); first at {idx}: "
            f"got {a[idx].item()!r}, expected {e[idx].item()!r}; max abs err {(a - e).abs().max().item():.3e}"
        )


def assert_same_special(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "",
                        tol: Optional[tuple[float, float]] = None) -> None:
    """NaN exactly where expected is NaN (NaN == NaN), the same infinities with the same signs, and the
    finite entries within ``tol`` (rtol, atol), by default ``FINITE_TOL[dtype]``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    an, en = a.isnan(), e.isnan()
    assert torch.equal(an, en), (f"{name}: NaN at {an.nonzero()[:5].tolist()} (got) vs "
                                 f"{en.nonzero()[:5].tolist()} (loop); got {a.flatten()[:8].tolist()}, "
                                 f"loop {e.flatten()[:8].tolist()}")
    ai, ei = a.isinf(), e.isinf()
    assert torch.equal(ai, ei), f"{name}: inf at {ai.nonzero()[:5].tolist()} vs loop {ei.nonzero()[:5].tolist()}"
    assert torch.equal(a[ai], e[ei]), f"{name}: infinities of different sign"
    f = ~(an | ai)
    rtol, atol = FINITE_TOL[dtype] if tol is None else tol
    bad = ~((a[f] - e[f]).abs() <= atol + rtol * e[f].abs())
    assert not bad.any(), f"{name}: {int(bad.sum())} finite entries differ, max err {(a[f] - e[f]).abs().max():.3e}"


def assert_rel_norm(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """||a - e|| / ||e|| <= tol (the rule for masks in docs/ops.md, where a pixel at the threshold may flip)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    rel = ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
    assert rel <= tol, f"{name}: relative norm error {rel:.3e} > {tol:.1e}"


def flipped_fraction(actual_mask: torch.Tensor, expected_mask: torch.Tensor, atol: float = 1e-4) -> float:
    """Fraction of mask pixels that disagree by more than rounding (threshold flips)."""
    d = (actual_mask.double() - expected_mask.double()).abs() > atol * (1 + expected_mask.double().abs())
    return d.float().mean().item()


def rand(*shape, dtype=torch.float32, device="cpu", gen=None, low=None) -> torch.Tensor:
    """Fresh random data in fp64, rounded once to ``dtype`` (so oracles can use the exact same values)."""
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    if low is not None:
        x = x.abs() + low
    return x.to(dtype=dtype, device=device)


def rank_rows(seed: int, rank: int, world: int):
    """Global float64 rows every rank of a distributed test rebuilds from ``seed``: rank r holds 3 + r of
    them, labels 0..2 on every rank. ``(x (n, 2, 3) around 2, r (n, 2, 3) around -1, labels (n,), this
    rank's slice of the n rows)``."""
    g = torch.Generator().manual_seed(seed)
    sizes = [3 + i for i in range(world)]
    n = sum(sizes)
    y = torch.arange(n) % 3
    x = torch.randn(n, 2, 3, generator=g, dtype=torch.float64) + 2
    r = torch.randn(n, 2, 3, generator=g, dtype=torch.float64) - 1
    o = sum(sizes[:rank])
    return x, r, y, slice(o, o + sizes[rank])


def noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: every other column of a wider buffer."""
    big = torch.full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"), dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    return big[..., ::2]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_fp_rule(actual: torch.Tensor, oracle: torch.Tensor, plain, name: str = "",
                   *, factor: float = 2.0, floor_ulps: Optional[float] = None) -> None:
    """The project's tolerance rule for results below float64 (FlashAttention's rule).

    ``oracle`` is the float64 value of the formula on the same (already rounded) inputs; ``plain`` is
    a plain-PyTorch computation of the same formula in the op's own precision (float32 accumulation,
    result stored in ``actual.dtype``). The op passes when

        max |actual - oracle|  <=  factor * max |plain - oracle|  +  floor_ulps * eps(actual.dtype) * max |oracle|

    ``floor_ulps`` defaults to 8, and to 32 for outputs of fewer than 16 elements (a scalar loss),
    where one lucky plain rounding would otherwise set the whole bar.

    so the bar moves with the error a plain computation makes *on this machine* (MKL/oneDNN take
    different paths on Intel and AMD, and with the thread count), never with a tolerance tuned on one
    CPU. NaN positions must agree exactly, and so must infinities (value and sign).

    ``plain`` may be a sequence of equally valid plain computations (for example the same reduction in
    reversed order); the bar is then set by the farthest of them. That is how an ill-conditioned
    output (gradcam++'s nearly cancelling denominators) is judged fairly: a single plain run that
    happens to share the oracle's summation order understates the error of every other order.
    float64 results have no higher-precision oracle: use :func:`assert_close` with a tight tolerance.
    """
    plains = list(plain) if isinstance(plain, (list, tuple)) else [plain]
    for p in plains:
        assert actual.shape == oracle.shape == p.shape, (
            f"{name}: shapes {tuple(actual.shape)}, oracle {tuple(oracle.shape)}, plain {tuple(p.shape)}")
    a, o = (v.detach().double().cpu() for v in (actual, oracle))
    ps = [p.detach().double().cpu() for p in plains]
    nan_a, nan_o = a.isnan(), o.isnan()
    assert torch.equal(nan_a, nan_o), f"{name}: NaN at {int((nan_a != nan_o).sum())} positions where the oracle has none (or vice versa)"
    inf_a, inf_o = a.isinf(), o.isinf()
    assert torch.equal(inf_a, inf_o) and torch.equal(a[inf_a], o[inf_o]), f"{name}: infinities differ from the oracle"
    fin = ~(nan_o | inf_o)
    if not fin.any():
        return
    a, o = a[fin], o[fin]
    err = (a - o).abs().max().item()
    plain_err = max((p[fin] - o).abs().nan_to_num(float("inf")).max().item() for p in ps)
    if floor_ulps is None:
        floor_ulps = 8.0 if actual.numel() >= 16 else 32.0
    floor = floor_ulps * _eps(actual.dtype) * o.abs().max().item()
    allowed = factor * plain_err + floor
    if not err <= allowed:
        i = int((a - o).abs().argmax())
        raise AssertionError(
            f"{name}: max error vs the fp64 oracle {err:.3e} > {factor:g} x plain PyTorch's {plain_err:.3e} "
            f"+ floor {floor:.1e} (worst element: got {a[i].item()!r}, oracle {o[i].item()!r})")


def assert_formula(actual: torch.Tensor, formula, name: str = "", **kw) -> None:
    """:func:`assert_fp_rule` with both references from one dtype-generic ``formula(dtype)``.

    ``formula(torch.float64)`` is the oracle; ``formula(acc)`` with ``acc`` the op's accumulation
    dtype (float32 for float32/float16/bfloat16 results), rounded to ``actual.dtype``, is the plain
    computation. A float64 ``actual`` is compared element-wise at 1e-10 relative.
    """
    oracle = formula(torch.float64)
    if actual.dtype == torch.float64:
        assert_close(actual, oracle, 1e-10, 1e-12 * max(1.0, oracle.abs().max().item()), name)
        return
    plain = formula(torch.float32).to(actual.dtype)
    assert_fp_rule(actual, oracle, plain, name, **kw)


def assert_within_torch_error(actual: torch.Tensor, torch_result: torch.Tensor, oracle: torch.Tensor, rtol: float,
                              atol: float, name: str = "") -> None:
    """FlashAttention's rule: max error vs the fp64 oracle at most 2x plain PyTorch's in the same dtype, plus slack.

    Used where the math itself is ill-conditioned (e.g. gradcam++'s alpha), so a fixed element-wise
    tolerance would be either flaky or meaningless.
    """
    a, t, e = (v.detach().double().cpu() for v in (actual, torch_result, oracle))
    err, torch_err = (a - e).abs().max().item(), (t - e).abs().max().item()
    allowed = 2 * torch_err + atol + rtol * e.abs().max().item()
    if not err <= allowed:
        idx = tuple(int(i) for i in torch.unravel_index((a - e).abs().flatten().argmax(), a.shape)) if a.dim() else ()
        raise AssertionError(f"{name}: max error vs fp64 {err:.3e} > 2 x torch's {torch_err:.3e} + slack "
                             f"(worst at {idx}: got {a[idx].item()!r}, fp64 {e[idx].item()!r})")
