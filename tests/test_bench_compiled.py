"""The ``compiled`` provider's formulas (edfkern.bench.compiled) agree with the public ops.

Each formula runs eagerly and under ``torch.compile`` on small fresh random data and is judged
by the project's tolerance rule (docs/ops.md): its error against the float64 public op is at most
twice the float32 public op's, plus a few ulps. The semantics that rounding could hide get exact
tests of their own: CPD's stable-sort tie-break and DAE's ``>=`` threshold. Compiling every
formula costs a few seconds each on a 2-core CPU (inductor's disk cache makes repeats faster).
"""
from __future__ import annotations

import pytest
import torch

import edfkern
from edfkern.bench import compiled as C
from edfkern.bench.cases import OPS
from tests._utils import assert_close, assert_fp_rule, assert_rel_norm, rand

K = 3
RUNS = ["eager", "compiled"]


def _fn(op: str, run: str):
    return C.FORMULAS[op] if run == "eager" else C.compiled(op)


def _judge(op: str, run: str, make_args, kw: dict, grad_of=None) -> None:
    """Formula (float32) vs the public op in float64 (oracle) and float32 (the bar); value and, where
    ``grad_of`` names the argument index, its gradient."""
    public = getattr(edfkern, op)
    res = {}
    for name, fn, dtype in (("formula", _fn(op, run), torch.float32), ("plain", public, torch.float32),
                            ("oracle", public, torch.float64)):
        args = make_args(dtype)
        if grad_of is not None:
            args[grad_of].requires_grad_(True)
        out = fn(*args, **kw)
        g = None
        if grad_of is not None:
            out.backward()
            g = args[grad_of].grad
        res[name] = (out.detach(), g)
    assert res["formula"][0].dtype == torch.float32
    assert_fp_rule(res["formula"][0], res["oracle"][0], res["plain"][0], f"{op} {run} value")
    if grad_of is not None:
        assert_fp_rule(res["formula"][1], res["oracle"][1], res["plain"][1], f"{op} {run} grad")


def _data(seed: int, *shapes, low=None):
    gen = torch.Generator().manual_seed(seed)
    base = [rand(*s, gen=gen, low=low) for s in shapes]  # float32 values, rounded once
    return lambda dtype: [b.to(dtype).clone() for b in base]


def test_every_op_has_a_formula():
    assert set(C.FORMULAS) == set(OPS)


@pytest.mark.parametrize("run", RUNS)
def test_local_covariance(run):
    _judge("local_covariance", run, _data(1, (K * 5, 8, 6)), dict(groups=K), grad_of=None)
    x = _data(2, (K * 5, 8, 6))(torch.float32)[0]
    # a gradient through the (K, C, C) output, judged the same way
    gout = rand(K, 8, 8, gen=torch.Generator().manual_seed(3))

    def grad(fn, dtype):
        xx = x.detach().to(dtype).clone().requires_grad_(True)
        (fn(xx, groups=K) * gout.to(dtype)).sum().backward()
        return xx.grad

    assert_fp_rule(grad(_fn("local_covariance", run), torch.float32), grad(edfkern.local_covariance, torch.float64),
                   grad(edfkern.local_covariance, torch.float32), "local_covariance grad")


@pytest.mark.parametrize("run", RUNS)
def test_covariance_matching_loss(run):
    _judge("covariance_matching_loss", run, _data(4, (K * 6, 8, 5), (K * 4, 8, 5)),
           dict(syn_groups=K, real_groups=K, weight=0.01), grad_of=0)


@pytest.mark.parametrize("run", RUNS)
def test_class_centralization_loss(run):
    _judge("class_centralization_loss", run, _data(5, (K * 7, 16)), dict(groups=K, weight=0.05), grad_of=0)


@pytest.mark.parametrize("run", RUNS)
def test_mean_matching_loss(run):
    _judge("mean_matching_loss", run, _data(6, (K * 5, 16), (K * 3, 16)), dict(syn_groups=K, real_groups=K),
           grad_of=0)


@pytest.mark.parametrize("run", RUNS)
def test_cpd_trajectory_loss(run):
    _judge("cpd_trajectory_loss", run, _data(7, (1000,), (1000,), (1000,)), dict(drop_ratio=0.375), grad_of=0)


@pytest.mark.parametrize("run", RUNS)
def test_cpd_tie_break_is_the_stable_sort(run):
    """Equal l across the cut: the lower indices are dropped first; the kept set (the gradient's
    support) and the loss match the public op exactly."""
    P = 64
    target = torch.zeros(P)
    start = torch.arange(1.0, P + 1)
    student = (torch.arange(P) % 4).float()  # l in {0, 1, 4, 9}, 16 of each; k = 24 cuts the l = 1 group
    outs = []
    for fn in (_fn("cpd_trajectory_loss", run), edfkern.cpd_trajectory_loss):
        s = student.clone().requires_grad_(True)
        loss = fn(s, target, start, drop_ratio=24 / P)
        loss.backward()
        outs.append((loss.detach(), s.grad))
    (lf, gf), (lo, go) = outs
    assert torch.equal(gf != 0, go != 0), "kept sets differ"
    dropped_ones = [i for i in range(P) if i % 4 == 1 and gf[i] == 0]
    assert dropped_ones == [1, 5, 9, 13, 17, 21, 25, 29], dropped_ones  # the 8 lowest indices with l = 1
    assert_close(lf, lo, 1e-6, 0, "cpd tie loss")
    assert_close(gf, go, 1e-6, 1e-9, "cpd tie grad")


@pytest.mark.parametrize("run", RUNS)
def test_grad_cam_smoothgradcampp(run):
    make = _data(8, (3, 4, 6, 4, 4), (3, 4, 6, 4, 4), (4, 6, 4, 4))

    def args(dtype):
        a, g, clean = make(dtype)
        return [a.abs(), g, clean.abs()]  # post-ReLU activations are >= 0

    res = {name: fn(*args(dt)[:2], method="smoothgradcam++", clean_activations=args(dt)[2])
           for name, fn, dt in (("formula", _fn("grad_cam", run), torch.float32),
                                ("plain", edfkern.grad_cam, torch.float32),
                                ("oracle", edfkern.grad_cam, torch.float64))}
    assert_fp_rule(res["formula"], res["oracle"], res["plain"], "grad_cam")


@pytest.mark.parametrize("run", RUNS)
def test_dae_(run):
    """grad *= mask on random data; masks compare by relative norm (a pixel at tau may flip, docs/ops.md)."""
    gen = torch.Generator().manual_seed(9)
    grad = rand(4, 3, 16, 16, gen=gen)
    cam = torch.rand(4, 4, 4, generator=gen)
    a, b = grad.clone(), grad.clone()
    out = _fn("dae_", run)(a, cam, beta=1.0)
    edfkern.dae_(b, cam, beta=1.0)
    assert out.data_ptr() == a.data_ptr(), "dae_ must work in place"
    assert_rel_norm(a, b, 1e-5, "dae_")


@pytest.mark.parametrize("run", RUNS)
def test_dae_threshold_is_inclusive(run):
    """At the same size U(cam) = cam; a map whose mean equals some of its values keeps them (>=)."""
    cam = torch.tensor([0.0, 1.0, 2.0, 1.0]).repeat(4).view(1, 4, 4)  # mean exactly 1
    grad = torch.ones(1, 2, 4, 4)
    a, b = grad.clone(), grad.clone()
    _fn("dae_", run)(a, cam, beta=0.5)
    edfkern.dae_(b, cam, beta=0.5)
    assert torch.equal(a, b)
    assert torch.equal(a[0, 0], torch.tensor([1.0, 1.5, 2.5, 1.5]).repeat(4).view(4, 4))


@pytest.mark.parametrize("run", RUNS)
def test_dae_sgd_step_(run):
    gen = torch.Generator().manual_seed(10)
    param, grad, buf = (rand(4, 3, 16, 16, gen=gen) for _ in range(3))
    cam = torch.rand(4, 4, 4, generator=gen)
    kw = dict(lr=0.1, beta=1.0, momentum=0.5)
    p1, b1, p2, b2, g0 = param.clone(), buf.clone(), param.clone(), buf.clone(), grad.clone()
    _fn("dae_sgd_step_", run)(p1, grad, b1, cam, **kw)
    edfkern.dae_sgd_step_(p2, grad, b2, cam, **kw)
    assert torch.equal(grad, g0), "grad must not be modified"
    assert_rel_norm(b1, b2, 1e-5, "momentum buffer")
    assert_rel_norm(p1, p2, 1e-5, "param")


def test_formulas_refuse_label_groups_with_a_clear_error():
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match="groups"):
        C.class_centralization_loss(x, groups=torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="groups"):
        C.class_centralization_loss(x, groups=4)


def test_compiled_case_is_warm_and_never_recompiles_while_timed():
    """make_case compiles and warms at the timed shape; a recompile inside a timed call raises."""
    import torch

    from edfkern.bench.cases import make_case

    case = make_case("mean_matching_loss", "compiled", "full", "cifar10-ipc1000", scale=1e-9)
    assert case.compile_s is not None and case.compile_s >= 0
    case.reset()
    case.fn()
    with torch.compiler.set_stance("fail_on_recompile"):
        case.reset()
        case.fn()
