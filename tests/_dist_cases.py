"""The distributed test cases, run inside one spawned gloo world (``tests/_dist_launch.py``).

``python tests/_dist_cases.py RANK WORLD OUTDIR [FILTER]`` joins the world, runs every case in
:data:`CASES` in the same order on every rank and writes ``OUTDIR/rank{RANK}.json`` with
``{case: "ok" | "skip: ..." | traceback}``. Every rank generates the *global* data from one seed and
takes its own rows, so each case can compare with the single-process op on the concatenation.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
import traceback
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repo root

import edfkern  # noqa: E402
import edfkern.baselines as B  # noqa: E402
import edfkern.distributed as ED  # noqa: E402
from edfkern.distributed import _comm  # noqa: E402
from edfkern.distributed.cpd import payload_bytes  # noqa: E402
from tests._utils import assert_close, assert_within_torch_error, rank_rows  # noqa: E402

RANK = WORLD = 0
PG = None
CASES: dict[str, callable] = {}


EDGE_CASES: dict[str, callable] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def edge(fn):
    """A case of ``tests/test_edges_distributed.py`` (run in its own worlds, not in test_distributed.py's)."""
    EDGE_CASES[fn.__name__] = fn
    return fn


class Skip(Exception):
    pass


def backends(*, full: bool = False) -> list[str]:
    """Available CPU backends. The local part does not depend on the world size, so the slow interpreted
    Triton kernels run at world size 2 only (``full``) and the other worlds check reference and native."""
    names = [n for n, b in edfkern.backends().items() if b["available"] and "cpu" in b["devices"]]
    return names if (full and WORLD == 2) else [n for n in names if n != "triton"]


# ----------------------------------------------------------------------------- helpers


def one_process():
    """The single-process float64 oracle: the public ops at world size 2, the loop formulations of
    ``edfkern.baselines`` elsewhere. (The public ops are ``torch.library`` custom ops, whose first call
    imports torch._dynamo: about 18 s of CPU per process on a loaded 2-core machine, so only the
    world of 2 pays it; the public ops are checked against the baselines in their own tests.)"""
    return edfkern if WORLD == 2 else B


def same_on_every_rank(t: torch.Tensor, what: str) -> None:
    """Bitwise identical on all ranks (a CRC of the bytes, exchanged in one header collective)."""
    crc = zlib.crc32(t.detach().double().contiguous().numpy().tobytes())
    table = _comm.gather_ints([crc], group=PG, what="test crc")
    assert all(r == table[0] for r in table), f"{what} differs across ranks: {table}"


def layout(kind: str, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Per-rank labels (in rank order). ``uneven``: rank r holds k + 2 + 3r rows, rank 0 none of class 0
    (when W > 1). ``empty-rank``: the last rank holds no row at all (W > 1)."""
    out = []
    for r in range(WORLD):
        if kind == "empty-rank" and WORLD > 1 and r == WORLD - 1:
            out.append(torch.zeros(0, dtype=torch.int64))
            continue
        lo = 1 if (kind == "uneven" and r == 0 and WORLD > 1) else 0
        n = k + 2 + 3 * r
        lab = torch.cat([torch.arange(lo, k), torch.randint(lo, k, (n - (k - lo),), generator=gen)])
        out.append(lab[torch.randperm(n, generator=gen)])
    return out


def split(x: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
    """This rank's rows of the concatenation ``x`` (rank order)."""
    sizes = [len(v) for v in labels]
    start = sum(sizes[:RANK])
    return x[start:start + sizes[RANK]]


def feats(n: int, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """float64 features with a mean far from zero (what breaks a naive merge of moments)."""
    return torch.randn((n,) + shape, generator=gen, dtype=torch.float64) + 3.0


def leaf(x: torch.Tensor, dtype) -> torch.Tensor:
    """A fresh leaf copy of ``x`` in ``dtype`` that requires grad."""
    return x.detach().to(dtype).clone().requires_grad_(True)


def check_value(name: str, got: torch.Tensor, base32: torch.Tensor, oracle: torch.Tensor, dtype) -> None:
    """float64: close to the oracle; otherwise within 2x plain PyTorch's float32 error (for a result stored
    in a half dtype, plain PyTorch's result is rounded to that dtype too)."""
    if got.dtype in (torch.float16, torch.bfloat16):
        base32 = base32.to(got.dtype)
    if dtype == torch.float64:
        assert_close(got, oracle, 1e-10, 1e-12, name)
    else:
        assert_within_torch_error(got, base32, oracle, 1e-6, 1e-6, name)


# ----------------------------------------------------------------------------- ops vs one process


def _compare_pair_op(op: str, kind: str, backend: str, dtype, gen) -> None:
    K, C_, L = 3, 4, 5
    lab_s, lab_r = layout(kind, K, gen), layout(kind, K, gen)
    ys, yr = torch.cat(lab_s), torch.cat(lab_r)
    flat = op == "mean_matching_loss"
    shape = (C_ * L,) if flat else (C_, L)
    xs64, xr64 = feats(len(ys), shape, gen), feats(len(yr), shape, gen)
    xs, xr = xs64.to(dtype), xr64.to(dtype)
    w = 0.7
    mine_s = split(xs, lab_s).clone().requires_grad_(True)
    mine_r = split(xr, lab_r).clone().requires_grad_(True)
    with edfkern.use_backend(backend):
        loss = getattr(ED, op)(mine_s, mine_r, syn_groups=lab_s[RANK], real_groups=lab_r[RANK], num_groups=K,
                               weight=w, process_group=PG)
        loss.backward()
    same_on_every_rank(loss, f"{op} loss")
    o_s, o_r = leaf(xs, torch.float64), leaf(xr, torch.float64)
    oracle = getattr(one_process(), op)(o_s, o_r, syn_groups=ys, real_groups=yr, num_groups=K, weight=w)
    oracle.backward()
    b_s, b_r = leaf(xs, torch.float32), leaf(xr, torch.float32)
    base = getattr(B, op)(b_s, b_r, syn_groups=ys, real_groups=yr, num_groups=K, weight=w)
    base.backward()
    tag = f"{op}[{kind},{backend},{dtype}]"
    check_value(tag + " loss", loss, base, oracle, dtype)
    for side, mine, o, b, lab in (("syn", mine_s, o_s, b_s, lab_s), ("real", mine_r, o_r, b_r, lab_r)):
        if mine.shape[0]:
            check_value(f"{tag} grad {side}", mine.grad, split(b.grad, lab), split(o.grad, lab), dtype)


def _compare_local_cov(kind: str, backend: str, dtype, gen) -> None:
    K = 4
    lab = layout(kind, K, gen)
    y = torch.cat(lab)
    x = feats(len(y), (3, 6), gen).to(dtype)
    mine = split(x, lab).clone().requires_grad_(True)
    up = torch.randn(K + 1, 3, 3, generator=gen, dtype=torch.float64)
    with edfkern.use_backend(backend):
        sig = ED.local_covariance(mine, groups=lab[RANK], num_groups=K + 1, process_group=PG)  # class K: no rows
        (sig * up.to(sig.dtype)).sum().backward()
    same_on_every_rank(sig, "local_covariance")
    assert sig.shape == (K + 1, 3, 3) and bool((sig[K] == 0).all()), "a class with no row must give zeros"
    o = leaf(x, torch.float64)
    oracle = one_process().local_covariance(o, groups=y, num_groups=K + 1)
    (oracle * up).sum().backward()
    b = leaf(x, torch.float32)
    base = B.local_covariance(b, groups=y, num_groups=K + 1)
    (base * up.float()).sum().backward()
    tag = f"local_covariance[{kind},{backend},{dtype}]"
    check_value(tag, sig, base, oracle, dtype)
    if mine.shape[0]:
        check_value(tag + " grad", mine.grad, split(b.grad, lab), split(o.grad, lab), dtype)


def _compare_cc(kind: str, backend: str, dtype, gen) -> None:
    K = 3
    lab = layout(kind, K, gen)
    y = torch.cat(lab)
    x = feats(len(y), (7,), gen).to(dtype)
    mine = split(x, lab).clone().requires_grad_(True)
    with edfkern.use_backend(backend):
        loss = ED.class_centralization_loss(mine, groups=lab[RANK], weight=0.3, process_group=PG)  # K inferred
        loss.backward()
    same_on_every_rank(loss, "class_centralization_loss")
    o = leaf(x, torch.float64)
    oracle = one_process().class_centralization_loss(o, groups=y, weight=0.3)
    oracle.backward()
    b = leaf(x, torch.float32)
    base = B.class_centralization_loss(b, groups=y, weight=0.3)
    base.backward()
    tag = f"class_centralization_loss[{kind},{backend},{dtype}]"
    check_value(tag, loss, base, oracle, dtype)
    if mine.shape[0]:
        check_value(tag + " grad", mine.grad, split(b.grad, lab), split(o.grad, lab), dtype)


@case
def ops_match_one_process():
    """Every op, every backend, float32 and float64, both layouts: equal to one process on the union."""
    gen = torch.Generator().manual_seed(1)
    for backend in backends(full=True):
        for dtype in (torch.float32, torch.float64):
            for kind in ("uneven", "empty-rank"):
                _compare_local_cov(kind, backend, dtype, gen)
                _compare_cc(kind, backend, dtype, gen)
                for op in ("covariance_matching_loss", "mean_matching_loss"):
                    _compare_pair_op(op, kind, backend, dtype, gen)


@case
def half_precision_inputs():
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float16, torch.bfloat16):
        _compare_pair_op("covariance_matching_loss", "uneven", "reference", dtype, gen)


@case
def int_groups_class_contiguous_per_rank():
    """groups=K: each rank's rows in K equal blocks (rank r holds r+1 rows of every class)."""
    gen = torch.Generator().manual_seed(3)
    K = 3
    lab = [torch.arange(K).repeat_interleave(r + 1) for r in range(WORLD)]
    y = torch.cat(lab)
    xs, xr = feats(len(y), (4, 2), gen), feats(len(y), (4, 2), gen)
    got = ED.covariance_matching_loss(split(xs, lab), split(xr, lab), syn_groups=K, real_groups=K, process_group=PG)
    exp = one_process().covariance_matching_loss(xs, xr, syn_groups=y, real_groups=y)
    assert_close(got, exp, 1e-10, 1e-14, "CM with int groups")


@case
def stable_merge_large_mean():
    """float32 features with mean 1e4 and spread 1: the merge must stay at float32 rounding of the spread."""
    gen = torch.Generator().manual_seed(4)
    lab = layout("uneven", 2, gen)
    y = torch.cat(lab)
    x64 = torch.randn(len(y), 3, 4, generator=gen, dtype=torch.float64) + 1e4
    x = x64.float()
    sig = ED.local_covariance(split(x, lab), groups=lab[RANK], num_groups=2, process_group=PG)
    oracle = one_process().local_covariance(x.double(), groups=y, num_groups=2)
    base = B.local_covariance(x, groups=y, num_groups=2)
    assert_within_torch_error(sig, base, oracle, 1e-6, 1e-6, "large-mean covariance")


# ----------------------------------------------------------------------------- gradcheck on the union


class _Replicate(torch.autograd.Function):
    """Identity whose backward sums the gradient over ranks (the test's stand-in for DDP)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return _comm.all_reduce_sum_([g.clone()], group=PG, what="test replicate")[0]


@case
def gradcheck_fp64():
    """fp64 gradcheck of every op as a function of the *global* rows: every rank perturbs the same
    element of the replicated input, so the numerical Jacobian is that of the union."""
    if WORLD not in (2, 3):
        raise Skip("run at world sizes 2 (every backend) and 3 (reference, with an empty rank)")
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 4] + [2] * (WORLD - 2)
    sizes[-1] = 0 if WORLD > 2 else sizes[-1]
    n = sum(sizes)
    start = sum(sizes[:RANK])
    y = torch.tensor([i % 2 for i in range(n)])
    y_me = y[start:start + sizes[RANK]]
    x = (torch.randn(n, 2, 3, generator=gen, dtype=torch.float64) + 2).requires_grad_(True)
    r = (torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mine = lambda t: _Replicate.apply(t)[start:start + sizes[RANK]]  # noqa: E731
    for backend in backends() if WORLD == 2 else ["reference"]:
        with edfkern.use_backend(backend):
            fns = {
                "local_covariance": (lambda a: ED.local_covariance(mine(a), groups=y_me, num_groups=2, process_group=PG),
                                     (x,)),
                "covariance_matching_loss": (lambda a, b: ED.covariance_matching_loss(
                    mine(a), mine(b), syn_groups=y_me, real_groups=y_me, num_groups=2, weight=0.5, process_group=PG),
                    (x, r)),
                "class_centralization_loss": (lambda a: ED.class_centralization_loss(
                    mine(a).flatten(1), groups=y_me, num_groups=2, process_group=PG), (x,)),
                "mean_matching_loss": (lambda a, b: ED.mean_matching_loss(
                    mine(a).flatten(1), mine(b).flatten(1), syn_groups=y_me, real_groups=y_me, num_groups=2,
                    process_group=PG), (x, r)),
            }
            for name, (fn, args) in fns.items():
                assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5), name
    p = 11 * WORLD
    cs = [p // WORLD + (3 if i == 0 else 0) - (3 if i == WORLD - 1 else 0) for i in range(WORLD)]
    o = sum(cs[:RANK])
    s = torch.arange(p, dtype=torch.float64).mul(0.37).sin().requires_grad_(True)  # distinct |s - t|
    t, s0 = torch.zeros(p, dtype=torch.float64), torch.full((p,), 0.5, dtype=torch.float64)
    fn = lambda a: ED.cpd_trajectory_loss(_Replicate.apply(a)[o:o + cs[RANK]], t[o:o + cs[RANK]],  # noqa: E731
                                          s0[o:o + cs[RANK]], drop_ratio=0.375, process_group=PG)
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-7, atol=1e-7, rtol=1e-5), "cpd_trajectory_loss"


# ----------------------------------------------------------------------------- CPD


def _chunks(p: int, gen: torch.Generator) -> list[int]:
    """Uneven chunk sizes in rank order adding up to p; with W >= 3 one middle rank holds nothing."""
    if WORLD == 1:
        return [p]
    cuts = sorted(torch.randint(0, p + 1, (WORLD - 1,), generator=gen).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [p])]
    if WORLD >= 3:  # rank 1 holds nothing
        sizes[0] += sizes[1]
        sizes[1] = 0
    return sizes


def _tie_heavy(p: int, dtype, gen: torch.Generator, borders: list[int]) -> torch.Tensor:
    """Few distinct levels (many ties), -0.0 and +0.0, +inf and NaNs, and equal values straddling borders."""
    l = (torch.randint(0, 5, (p,), generator=gen).to(torch.float64) * 0.25)
    l[torch.randint(0, p, (p // 10,), generator=gen)] = -0.0
    l[torch.randint(0, p, (p // 20,), generator=gen)] = float("inf")
    l[torch.randint(0, p, (p // 20,), generator=gen)] = float("nan")
    l[torch.randint(0, p, (p // 30,), generator=gen)] = -1.5
    for b in borders:
        if 0 < b < p:
            l[max(b - 3, 0):b + 3] = 0.5
    return l.to(dtype)


def _expected_keep(l: torch.Tensor, ratio: float) -> torch.Tensor:
    k = int(math.floor(ratio * l.numel()))
    keep = torch.ones(l.numel(), dtype=torch.bool)
    keep[torch.sort(l.float() if l.dtype != torch.float64 else l, stable=True).indices[:k]] = False
    return keep


@case
def cpd_keep_set_bit_identical():
    """Keep-sets equal a global stable torch.sort, ties across rank borders, -0/+0, inf and NaN included."""
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64, torch.float16):
        for p in (1, 7, 1000, 4099):
            sizes = _chunks(p, gen)
            borders = [sum(sizes[:i]) for i in range(1, WORLD)]
            l = _tie_heavy(p, dtype, gen, borders)
            o = sum(sizes[:RANK])
            for ratio in (0.0, 0.1, 0.25, 0.375, 0.5, 0.8, 0.95, 0.999):
                got = ED.cpd_keep_mask(l[o:o + sizes[RANK]], ratio, process_group=PG)
                exp = _expected_keep(l, ratio)[o:o + sizes[RANK]]
                assert torch.equal(got, exp), (f"keep-set differs: dtype {dtype}, P {p}, chunks {sizes}, ratio {ratio}, "
                                               f"{int((got != exp).sum())} of {exp.numel()} elements")


@case
def cpd_loss_and_grad_match_one_process():
    gen = torch.Generator().manual_seed(7)
    for backend in backends(full=True):
        for dtype in (torch.float32, torch.float64):
            p = 3001
            sizes = _chunks(p, gen)
            o, n = sum(sizes[:RANK]), sizes[RANK]
            s, t, s0 = (torch.randn(p, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
            t[::4] = s[::4]  # l == 0 ties, some across borders
            for b in [sum(sizes[:i]) for i in range(1, WORLD)]:
                t[max(b - 2, 0):b + 2] = s[max(b - 2, 0):b + 2]
            for ratio in (0.0, 0.25, 0.375):
                me = s[o:o + n].clone().requires_grad_(True)
                with edfkern.use_backend(backend):
                    loss = ED.cpd_trajectory_loss(me, t[o:o + n], s0[o:o + n], drop_ratio=ratio, process_group=PG)
                    loss.backward()
                same_on_every_rank(loss, "cpd loss")
                st = ED.last_call_stats("cpd_trajectory_loss")
                assert st.bytes == payload_bytes(WORLD, dtype, drops=ratio > 0), (st, payload_bytes(WORLD, dtype))
                one = s.double().clone().requires_grad_(True)
                exp = one_process().cpd_trajectory_loss(one, t.double(), s0.double(), drop_ratio=ratio)
                exp.backward()
                tag = f"cpd[{backend},{dtype},{ratio}]"
                assert_close(loss, exp, 1e-5 if dtype == torch.float32 else 1e-12, 0, tag + " loss")
                keep = _expected_keep((s.double() - t.double()) ** 2, ratio)[o:o + n]
                assert torch.equal(me.grad != 0, keep & (s[o:o + n] != t[o:o + n])), tag + " grad support"
                assert_close(me.grad, one.grad[o:o + n], 1e-5 if dtype == torch.float32 else 1e-12, 1e-12, tag + " grad")


@case
def cpd_nan_threshold():
    """More NaNs than kept entries: the threshold itself is NaN; the NaNs with lower index are dropped first."""
    p = 50
    s = torch.linspace(0, 1, p)
    s[::2] = float("nan")
    t, s0 = torch.zeros(p), torch.ones(p)
    sizes = [p] if WORLD == 1 else [p // WORLD] * (WORLD - 1) + [p - (p // WORLD) * (WORLD - 1)]
    o, n = sum(sizes[:RANK]), sizes[RANK]
    me = s[o:o + n].clone().requires_grad_(True)
    loss = ED.cpd_trajectory_loss(me, t[o:o + n], s0[o:o + n], drop_ratio=0.9, process_group=PG)
    loss.backward()
    keep = _expected_keep((s - t) ** 2, 0.9)[o:o + n]
    assert torch.equal(me.grad.isnan(), keep), "gradient support must be the kept (NaN) entries"
    assert torch.equal(me.grad[~keep], torch.zeros(int((~keep).sum()))), "dropped entries get zero gradient"


@case
def cpd_bytes_do_not_grow_with_p():
    gen = torch.Generator().manual_seed(8)
    seen = set()
    for p in (100, 100_000):
        sizes = _chunks(p, gen)
        v = torch.randn(sizes[RANK], generator=gen)
        ED.cpd_trajectory_loss(v, torch.zeros_like(v), torch.ones_like(v), drop_ratio=0.5, process_group=PG)
        seen.add(ED.last_call_stats("cpd_trajectory_loss").bytes)
    assert len(seen) == 1, seen


# ----------------------------------------------------------------------------- bad input raises on every rank


def _raises(fn, needle: str) -> None:
    try:
        fn()
    except ValueError as e:
        assert needle in str(e), f"ValueError without {needle!r}: {e}"
    else:
        raise AssertionError(f"no ValueError (expected one mentioning {needle!r})")
    # still in step: a good call right after works on every rank
    v = torch.ones(2 + RANK, 2, 2)
    ED.local_covariance(v, groups=1, process_group=PG)


@case
def bad_mismatched_c_and_l():
    if WORLD < 2:
        raise Skip("needs 2 ranks")
    c = 3 if RANK == 0 else 4
    _raises(lambda: ED.local_covariance(torch.randn(4, c, 2), groups=2, process_group=PG), "must be the same on every rank")
    l = 2 if RANK == WORLD - 1 else 5
    _raises(lambda: ED.covariance_matching_loss(torch.randn(4, 3, l), torch.randn(4, 3, l), syn_groups=2, real_groups=2,
                                                process_group=PG), "(L) must be the same on every rank")
    d = 6 if RANK == 0 else 7
    _raises(lambda: ED.mean_matching_loss(torch.randn(2, d), torch.randn(2, d), syn_groups=2, real_groups=2,
                                          process_group=PG), "must be the same on every rank")


@case
def bad_labels_out_of_range_on_one_rank():
    bad = WORLD - 1
    lab = torch.tensor([0, 1, 2 if RANK != bad else 3])
    _raises(lambda: ED.class_centralization_loss(torch.randn(3, 4), groups=lab, num_groups=3, process_group=PG),
            f"labels on rank {bad} must lie in [0, 3)")
    neg = torch.tensor([0, 1, 1 if RANK != bad else -1])
    _raises(lambda: ED.local_covariance(torch.randn(3, 2, 2), groups=neg, process_group=PG), f"rank {bad}")


@case
def bad_class_empty_on_every_rank():
    lab = torch.tensor([0, 0, 2])
    x = torch.randn(3, 2, 2)
    _raises(lambda: ED.covariance_matching_loss(x, x, syn_groups=lab, real_groups=torch.tensor([0, 1, 2]),
                                                num_groups=3, process_group=PG), "group 1 is empty on the syn side")
    _raises(lambda: ED.mean_matching_loss(x.flatten(1), x.flatten(1), syn_groups=torch.tensor([0, 1, 2]),
                                          real_groups=lab, num_groups=3, process_group=PG), "real side")
    _raises(lambda: ED.class_centralization_loss(x.flatten(1), groups=lab, process_group=PG), "group 1 is empty")
    sig = ED.local_covariance(x, groups=lab, process_group=PG)
    assert bool((sig[1] == 0).all()), "local_covariance gives zeros for a class empty everywhere"


@case
def bad_cpd_layout_and_args():
    v = torch.randn(5 + RANK)
    p = sum(5 + r for r in range(WORLD))
    _raises(lambda: ED.cpd_trajectory_loss(v, v, v, drop_ratio=0.5, process_group=PG, numel=p + 1), "do not add up")
    ED.cpd_trajectory_loss(v, v * 0, v * 0 + 1, drop_ratio=0.5, process_group=PG, numel=p)  # adds up: fine
    if WORLD > 1:
        vv = v.double() if RANK == 0 else v
        _raises(lambda: ED.cpd_trajectory_loss(vv, vv, vv, drop_ratio=0.5, process_group=PG), "dtype")
        _raises(lambda: ED.cpd_keep_mask(v, 0.5 if RANK else 0.25, process_group=PG), "drop_ratio")
        w = 0.1 if RANK else 0.2
        _raises(lambda: ED.class_centralization_loss(torch.randn(2, 3), groups=1, weight=w, process_group=PG), "weight")
    z = torch.zeros(0)
    _raises(lambda: ED.cpd_trajectory_loss(z, z, z, drop_ratio=0.5, process_group=PG), "P >= 1")


# ----------------------------------------------------------------------------- helpers for the other features


@case
def reduce_class_stats_and_shards():
    K = 10
    mine = ED.shard_classes(K, group=PG)
    table = _comm.gather_ints([mine.start, mine.stop], group=PG)
    assert table[0][0] == 0 and table[-1][1] == K and all(a[1] == b[0] for a, b in zip(table, table[1:])), table
    sums = torch.arange(K, dtype=torch.float64) * (RANK + 1)
    counts = torch.full((K,), RANK + 1, dtype=torch.int64)
    s, c = ED.reduce_class_stats(sums, counts, group=PG)
    tot = sum(r + 1 for r in range(WORLD))
    assert torch.equal(s, torch.arange(K, dtype=torch.float64) * tot) and torch.equal(c, torch.full((K,), tot))
    assert torch.equal(sums, torch.arange(K, dtype=torch.float64) * (RANK + 1)), "inputs must stay unchanged"
    if WORLD > 1:
        _raises(lambda: ED.reduce_class_stats(torch.zeros(K + RANK), torch.zeros(K + RANK), group=PG),
                "the shape of sums must be the same on every rank")


@case
def header_words_are_one_collective():
    """Bytes and calls per op (header included) as docs/distributed.md states them."""
    from edfkern.distributed._agree import HEADER_BYTES_PER_RANK
    x = torch.randn(4, 3, 5)
    ED.covariance_matching_loss(x, x + 1, syn_groups=2, real_groups=2, process_group=PG)
    st = ED.last_call_stats("covariance_matching_loss")
    K, C_, L = 2, 3, 5
    expect = HEADER_BYTES_PER_RANK * WORLD + 4 * 2 * (K * C_ * L + K) + 4 * 2 * K * C_ * C_
    assert st.calls == 3 and st.bytes == expect, (st, expect)


@case
def public_keyword_is_the_distributed_op():
    """``edfkern.<op>(..., process_group=pg)`` is the one obvious way: it gives the distributed op's result."""
    if WORLD != 2:
        raise Skip("checked at world size 2 (the public ops' first call is slow)")
    gen = torch.Generator().manual_seed(40 + RANK)
    syn, real = torch.randn(6, 3, 4, generator=gen), torch.randn(5 + RANK, 3, 4, generator=gen)
    ls, lr = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(5 + RANK) % 3
    pairs = [
        (edfkern.local_covariance(syn, groups=ls, num_groups=3, process_group=PG),
         ED.local_covariance(syn, groups=ls, num_groups=3, process_group=PG)),
        (edfkern.covariance_matching_loss(syn, real, syn_groups=ls, real_groups=lr, num_groups=3, process_group=PG),
         ED.covariance_matching_loss(syn, real, syn_groups=ls, real_groups=lr, num_groups=3, process_group=PG)),
        (edfkern.class_centralization_loss(syn.flatten(1), groups=3, process_group=PG),
         ED.class_centralization_loss(syn.flatten(1), groups=3, process_group=PG)),
        (edfkern.mean_matching_loss(syn.flatten(1), real.flatten(1), syn_groups=ls, real_groups=lr, num_groups=3,
                                    process_group=PG),
         ED.mean_matching_loss(syn.flatten(1), real.flatten(1), syn_groups=ls, real_groups=lr, num_groups=3,
                               process_group=PG)),
    ]
    s, t, s0 = (torch.randn(101 + 7 * RANK, generator=gen) for _ in range(3))
    pairs.append((edfkern.cpd_trajectory_loss(s, t, s0, drop_ratio=0.4, process_group=PG),
                  ED.cpd_trajectory_loss(s, t, s0, drop_ratio=0.4, process_group=PG)))
    pairs.append((edfkern.cpd_keep_mask(s, 0.4, process_group=PG), ED.cpd_keep_mask(s, 0.4, process_group=PG)))
    for i, (a, b) in enumerate(pairs):
        assert torch.equal(a, b), f"pair {i}: the public op with process_group differs from edfkern.distributed"
    # and the global statistics differ from this rank's own, so the keyword really reached the collectives
    assert not torch.equal(pairs[0][0], edfkern.local_covariance(syn, groups=ls, num_groups=3))


# ----------------------------------------------------------------------------- edges (issue 20, class 1)
#
# ``tests/test_edges_distributed.py`` runs these in worlds of 2 and 3 with a short collective timeout:
# ranks that call different ops, a local error on one rank followed by more calls, checks that can fail
# on one rank only, and the messages. Every case also checks that the ranks are still in step after it.


def _edge_data(seed: int):
    """This rank's view of the global rows of ``seed`` (:func:`tests._utils.rank_rows`)."""
    return rank_rows(seed, RANK, WORLD)


def _good(op: str, seed: int) -> None:
    """A correct call of ``op`` on this rank's share, checked against the single-process baseline of the union
    (a call paired with another rank's earlier call gives a different value)."""
    x, r, y, sl = _edge_data(seed)
    if op in ("cpd_trajectory_loss", "cpd_keep_mask"):
        s, t = x.flatten(), r.flatten()
        o, n = sl.start * 6, (sl.stop - sl.start) * 6
        if op == "cpd_keep_mask":
            got = ED.cpd_keep_mask(((s - t) ** 2)[o:o + n], 0.375, process_group=PG)
            assert torch.equal(got, B.cpd_keep_mask((s - t) ** 2, 0.375)[o:o + n]), f"{op}: keep-set differs"
            return
        got = ED.cpd_trajectory_loss(s[o:o + n], t[o:o + n], s[o:o + n] * 0, drop_ratio=0.375, process_group=PG)
        exp = B.cpd_trajectory_loss(s, t, s * 0, drop_ratio=0.375)
    elif op == "local_covariance":
        got = ED.local_covariance(x[sl], groups=y[sl], num_groups=3, process_group=PG)
        exp = B.local_covariance(x, groups=y, num_groups=3)
    elif op == "class_centralization_loss":
        got = ED.class_centralization_loss(x[sl].flatten(1), groups=y[sl], weight=0.3, process_group=PG)
        exp = B.class_centralization_loss(x.flatten(1), groups=y, weight=0.3)
    elif op == "reduce_class_stats":
        got = torch.cat(ED.reduce_class_stats(x[sl].sum(0).flatten(), torch.ones(6, dtype=torch.float64) * RANK,
                                              group=PG))
        exp = torch.cat([x.sum(0).flatten(), torch.full((6,), WORLD * (WORLD - 1) / 2, dtype=torch.float64)])
    else:
        flat = op == "mean_matching_loss"
        a, b = (x[sl].flatten(1), r[sl].flatten(1)) if flat else (x[sl], r[sl])
        got = getattr(ED, op)(a, b, syn_groups=y[sl], real_groups=y[sl], num_groups=3, weight=0.5, process_group=PG)
        exp = getattr(B, op)(x.flatten(1) if flat else x, r.flatten(1) if flat else r, syn_groups=y, real_groups=y,
                             num_groups=3, weight=0.5)
    assert_close(got, exp, 1e-10, 1e-12, f"{op} after the edge case")


def _on_every_rank(fn, kind, *needles: str) -> str:
    """``fn()`` must raise ``kind`` on this rank with every needle in the message, and the message must be
    the same on every rank (compared by CRC); returns it."""
    try:
        fn()
    except kind as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {kind.__name__}, got {type(e).__name__}: {e}") from e
    else:
        raise AssertionError(f"no {kind.__name__} on rank {RANK} (expected one mentioning {needles})")
    missing = [w for w in needles if w not in msg]
    assert not missing, f"{kind.__name__} without {missing}: {msg}"
    table = _comm.gather_ints([zlib.crc32(msg.encode())], group=PG, what="test message crc")
    assert all(r == table[0] for r in table), f"the message differs across ranks: {msg}"
    return msg


OPS = ("local_covariance", "class_centralization_loss", "covariance_matching_loss", "mean_matching_loss",
       "cpd_trajectory_loss", "cpd_keep_mask", "reduce_class_stats")


@edge
def different_ops_raise_on_every_rank():
    """Rank 0 calls one op, the others another (SIGABRT in gloo or a value on one rank before): a ValueError
    naming every rank's op, on every rank, and the next calls are correct."""
    pairs = [("local_covariance", "class_centralization_loss"), ("cpd_trajectory_loss", "cpd_keep_mask"),
             ("covariance_matching_loss", "mean_matching_loss"), ("mean_matching_loss", "covariance_matching_loss"),
             ("cpd_keep_mask", "local_covariance"), ("reduce_class_stats", "cpd_trajectory_loss")]
    for i, (a, b) in enumerate(pairs):
        _on_every_rank(lambda: _good(a if RANK == 0 else b, i), ValueError, "different edfkern ops",
                       f"rank 0: {a}", f"rank {WORLD - 1}: {b}")
        _good(b, 10 + i)
    for i, op in enumerate(OPS):  # and every op still pairs with itself
        _good(op, 20 + i)


def _local_errors():
    """(what, fn, expected type, words): a mistake on one rank only, caught by that rank's local checks."""
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    last = RANK == WORLD - 1
    lab = torch.tensor([0, 1, 0, 1])
    return [
        ("drop_ratio=1.5 on rank 0", lambda: ED.cpd_trajectory_loss(
            x.flatten(), x.flatten() * 0, x.flatten() + 1, drop_ratio=1.5 if RANK == 0 else 0.375, process_group=PG),
         ValueError, ["rank 0", "drop_ratio"], "cpd_trajectory_loss"),
        ("syn not a tensor", lambda: ED.covariance_matching_loss(
            [1.0] if last else x, x, syn_groups=2, real_groups=2, process_group=PG),
         TypeError, [f"rank {WORLD - 1}", "syn"], "covariance_matching_loss"),
        ("float labels", lambda: ED.local_covariance(x, groups=lab + (0.5 if RANK == 0 else 0), process_group=PG),
         TypeError, ["rank 0", "integer dtype"], "local_covariance"),
        ("weight=nan", lambda: ED.class_centralization_loss(
            x.flatten(1), groups=2, weight=float("nan") if last else 0.1, process_group=PG),
         ValueError, [f"rank {WORLD - 1}", "weight"], "class_centralization_loss"),
        ("num_groups=0", lambda: ED.mean_matching_loss(
            x.flatten(1), x.flatten(1), syn_groups=lab, real_groups=lab, num_groups=0 if RANK == 0 else 2,
            process_group=PG), ValueError, ["rank 0", "num_groups"], "mean_matching_loss"),
        ("a missing argument", lambda: ED.cpd_keep_mask(x.flatten(), process_group=PG) if RANK == 0 else
         ED.cpd_keep_mask(x.flatten(), 0.5, process_group=PG), TypeError, ["rank 0", "drop_ratio"], "cpd_keep_mask"),
        ("labels of the wrong length", lambda: ED.covariance_matching_loss(
            x, x, syn_groups=torch.tensor([0, 1, 0, 1, 1][:5 if last else 4]), real_groups=2, process_group=PG),
         ValueError, [f"rank {WORLD - 1}", "shape"], "covariance_matching_loss"),
        ("counts not a tensor", lambda: ED.reduce_class_stats(torch.ones(2), [1, 1] if RANK == 0 else torch.ones(2),
                                                              group=PG),
         TypeError, ["rank 0", "counts"], "reduce_class_stats"),
    ]


@edge
def local_error_on_one_rank_raises_everywhere_and_stays_in_step():
    """A rank whose own checks fail (drop_ratio=1.5, ...) used to leave its next call paired with the others'
    previous one (0.247638 instead of 0.247776): now every rank raises, and later calls are correct."""
    for i, (what, fn, kind, words, op) in enumerate(_local_errors()):
        try:
            _on_every_rank(fn, kind, "so every rank raises", *words)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from e
        _good(op, 30 + i)
        _good("cpd_trajectory_loss", 40 + i)


@edge
def one_rank_checks_are_agreed_before_the_data():
    """Checks that ran after the header on one rank only (the others waited for the collective timeout)."""
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    big = torch.tensor([0, 1, 0, 5])
    calls = {  # rank 1 passes labels with 5 >= K = 2, the others an int groups=2
        "local_covariance": lambda g: ED.local_covariance(x, groups=g, num_groups=2, process_group=PG),
        "class_centralization_loss": lambda g: ED.class_centralization_loss(x.flatten(1), groups=g, num_groups=2,
                                                                            process_group=PG),
        "mean_matching_loss": lambda g: ED.mean_matching_loss(x.flatten(1), x.flatten(1), syn_groups=2,
                                                              real_groups=g, num_groups=2, process_group=PG),
        "covariance_matching_loss": lambda g: ED.covariance_matching_loss(x, x, syn_groups=g, real_groups=2,
                                                                          num_groups=2, process_group=PG),
    }
    for i, (op, call) in enumerate(calls.items()):
        _on_every_rank(lambda: call(big if RANK == 1 else 2), ValueError, "labels on rank 1 must lie in [0, 2)")
        _good(op, 50 + i)
    # K > MAX_SPARSE_GROUPS: allowed when the union has K rows, though rank 1 has 2
    K = 65_600
    n = K if RANK == 0 else 2
    g = torch.Generator().manual_seed(60)
    vals = torch.randn(sum(K if r == 0 else 2 for r in range(WORLD)), generator=g, dtype=torch.float64)
    o = sum(K if r == 0 else 2 for r in range(RANK))
    y = torch.arange(n) if RANK == 0 else torch.zeros(n, dtype=torch.int64)
    sig = ED.local_covariance(vals[o:o + n].view(n, 1, 1), groups=y, num_groups=K, process_group=PG)
    class0 = torch.cat([vals[:1], vals[K:]])  # class 0: rank 0's first row and every other rank's rows
    assert sig.shape == (K, 1, 1) and bool((sig[1:] == 0).all()), "classes with one row have zero covariance"
    assert_close(sig[0, 0, 0], class0.var(unbiased=False), 1e-12, 1e-14, "class 0 over the ranks")
    # ... and refused on every rank when K passes both the union's rows and MAX_SPARSE_GROUPS
    _on_every_rank(lambda: ED.local_covariance(torch.randn(3, 1, 1), groups=torch.arange(3) * 40_000,
                                               process_group=PG), ValueError, "80001 groups", "65536")
    lab99 = torch.tensor([0, 1, 0, 99 if RANK == 0 else 1])  # K = 100: more than either side's rows
    _on_every_rank(lambda: ED.covariance_matching_loss(x, x, syn_groups=lab99, real_groups=lab99 % 2,
                                                       process_group=PG), ValueError, "max label + 1 = 100")
    _good("local_covariance", 61)


@edge
def scalar_mismatch_prints_values():
    """weight and drop_ratio that differ across ranks: the message shows the values, not float64 bit patterns."""
    x = torch.randn(4, 6, dtype=torch.float64)
    _on_every_rank(lambda: ED.class_centralization_loss(x, groups=2, weight=0.1 if RANK == 0 else 0.2,
                                                        process_group=PG),
                   ValueError, "weight must be the same on every rank", "rank 0: 0.1", "rank 1: 0.2")
    _on_every_rank(lambda: ED.covariance_matching_loss(x.view(4, 2, 3), x.view(4, 2, 3), syn_groups=2, real_groups=2,
                                                       weight=1e-3 if RANK else 0.01, process_group=PG),
                   ValueError, "rank 0: 0.01", "rank 1: 0.001")
    _on_every_rank(lambda: ED.cpd_keep_mask(x.flatten(), 0.25 if RANK == 0 else 0.5, process_group=PG),
                   ValueError, "drop_ratio must be the same on every rank", "rank 0: 0.25", "rank 1: 0.5")
    _good("mean_matching_loss", 70)


class _InterruptingRatio(float):
    """A drop_ratio whose conversion raises KeyboardInterrupt: a call interrupted before its header."""

    def __float__(self):
        raise KeyboardInterrupt


@edge
def out_of_step_ranks_line_up_again():
    """A call that started on one rank and never sent its header (here: interrupted in its checks) leaves that
    rank one call ahead. The counters expose it: the ranks behind raise for that call, the rank ahead
    re-pairs its next call with their next one, and every later call is correct."""
    v = torch.ones(4, dtype=torch.float64)
    if RANK == 0:
        try:
            ED.cpd_trajectory_loss(v, v, v, drop_ratio=_InterruptingRatio(0.5), process_group=PG)
        except KeyboardInterrupt:
            pass
        _good("cpd_trajectory_loss", 80)  # pairs with the others' second call
    else:
        try:
            _good("cpd_trajectory_loss", 81)
        except ValueError as e:
            assert "out of step" in str(e) and "rank 0: call" in str(e), str(e)
        else:
            raise AssertionError("the rank behind must raise for the call rank 0 lost")
        _good("cpd_trajectory_loss", 80)
    for i, op in enumerate(OPS):
        _good(op, 82 + i)


def main() -> int:
    global RANK, WORLD, PG
    RANK, WORLD, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    only = sys.argv[4] if len(sys.argv) > 4 else ""
    suite = EDGE_CASES if len(sys.argv) > 5 and sys.argv[5] == "edges" else CASES
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=RANK,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=float(os.environ.get(
                                "EDFKERN_DIST_TIMEOUT", "60"))))
    PG = dist.group.WORLD
    results = {}
    for name, fn in suite.items():
        if only and only not in name:
            continue
        t0 = time.perf_counter()
        try:
            if os.environ.get("EDFKERN_DIST_TEST_PROFILE") and RANK == 0:
                import cProfile
                cProfile.runctx("fn()", globals(), {"fn": fn}, os.path.join(out, f"{name}.prof"))
            else:
                fn()
            results[name] = "ok"
        except Skip as e:
            results[name] = f"skip: {e}"
        except Exception:  # noqa: BLE001  (reported per case)
            results[name] = traceback.format_exc()
            print(f"rank {RANK}: case {name} failed:\n{results[name]}", flush=True)  # shown if the world dies
        if os.environ.get("EDFKERN_DIST_TEST_TIMES"):
            print(f"rank {RANK}: {name} {time.perf_counter() - t0:.1f} s", flush=True)
    if os.environ.get("EDFKERN_DIST_TEST_TIMES"):
        print(f"rank {RANK}: torch._dynamo imported: {'torch._dynamo' in sys.modules}", flush=True)
    with open(os.path.join(out, f"rank{RANK}.json"), "w") as f:
        json.dump(results, f)
    edfkern.distributed.shutdown()
    return 0


if __name__ == "__main__":
    ED.exit_process(main())  # os._exit after shutdown: torch's gloo finalization may abort (see its docstring)
