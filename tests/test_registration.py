"""torch.library registration: opcheck on every edfkern:: op, torch.compile(fullgraph=True) through DD steps."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import edfkern
from tests._utils import assert_close, rand
from tests.opinfo import OPS


def opcheck_cases(device) -> dict[str, tuple]:
    """``{case: (registered op overload, args)}`` from every op's ``opcheck`` entry, one generator for all."""
    gen = torch.Generator().manual_seed(0)
    return {name: case for op in OPS for name, case in op.opcheck(device, gen).items()}


CASE_NAMES = list(opcheck_cases("cpu").keys())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(backend, device, name):
    op, args = opcheck_cases(device)[name]
    # gradients are checked separately with gradcheck; opcheck covers schema, fake tensors and autograd registration
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_every_public_op_is_registered():
    """The op table (tests/opinfo.py) is complete and true: an entry per public op, every ``edfkern::`` op
    registered and listed under one entry, and every contract kernel listed under an entry."""
    import edfkern.reference as R

    public_ops = {n for n in edfkern.__all__ if n not in ("set_backend", "use_backend", "backends",
                                                             "current_backend", "config")}
    assert {op.name for op in OPS} == public_ops
    listed = [n for op in OPS for n in op.registered]
    assert len(listed) == len(set(listed)), "a registered op listed under two entries"
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("edfkern::")}
    assert set(listed) == registered
    for n in listed:
        assert hasattr(torch.ops.edfkern, n), n
    assert {k for op in OPS for k in op.kernels} == set(R.__all__)


# ----------------------------------------------------------------------------- torch.compile


def dd_step(image_syn, cam, real_feat, student, target, start):
    """A DM+IID / MTT+EDF flavoured step: features, losses, backward-like update through dae_."""
    feat = image_syn.flatten(2)  # (N, C, L) stands in for conv features
    loss = edfkern.covariance_matching_loss(feat, real_feat, syn_groups=2, real_groups=2, weight=0.01)
    loss = loss + edfkern.class_centralization_loss(image_syn, groups=2, weight=0.05)
    loss = loss + edfkern.mean_matching_loss(image_syn, real_feat, syn_groups=2, real_groups=2)
    loss = loss + edfkern.cpd_trajectory_loss(student, target, start, drop_ratio=0.25)
    return loss


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_dd_step(backend, device, compile_backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    img = rand(4, 3, 4, 4, gen=gen).to(device).requires_grad_()
    real = rand(6, 3, 16, gen=gen).to(device)
    s, t, s0 = (rand(64, gen=gen).to(device) for _ in range(3))
    s.requires_grad_()
    cam = torch.rand(4, 2, 2, generator=gen).to(device)
    eager = dd_step(img, cam, real, s, t, s0)
    g_eager = torch.autograd.grad(eager, (img, s))
    compiled = torch.compile(dd_step, fullgraph=True, backend=compile_backend)
    out = compiled(img, cam, real, s, t, s0)
    g_comp = torch.autograd.grad(out, (img, s))
    assert_close(out, eager, 1e-5, 1e-6, "loss")
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, 1e-5, 1e-6, "grad")


def test_compile_fullgraph_dae_inplace(backend, device):
    torch._dynamo.reset()

    def masked_update(grad, cam, param, buf):
        edfkern.dae_(grad, cam, beta=1.0)
        edfkern.dae_sgd_step_(param, grad, buf, cam, lr=0.1, beta=0.0, threshold=-1.0, momentum=0.5)
        return grad.sum()

    gen = torch.Generator().manual_seed(2)
    grad, param, buf = (rand(3, 3, 9, 7, gen=gen).to(device) for _ in range(3))
    cam = torch.rand(3, 3, 3, generator=gen).to(device)
    ref = [v.clone() for v in (grad, param, buf)]
    masked_update(*ref[:1], cam, *ref[1:])
    compiled = torch.compile(masked_update, fullgraph=True, backend="aot_eager")
    compiled(grad, cam, param, buf)
    for a, b, n in zip((grad, param, buf), ref, ("grad", "param", "buf")):
        assert_close(a, b, 1e-6, 1e-7, n)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_masks_and_cams(backend, device, compile_backend):
    """The ops whose checks bound an output's size (dae_mask, grad_cam with size) trace without a break."""
    torch._dynamo.reset()

    def masks_and_cams(cam, A, G):
        return edfkern.dae_mask(cam, beta=1.0, size=(8, 8)), edfkern.grad_cam(A, G, method="gradcam++", size=(8, 8))

    gen = torch.Generator().manual_seed(3)
    cam = torch.rand(2, 4, 4, generator=gen).to(device)
    A, G = rand(2, 3, 4, 4, gen=gen).to(device), rand(2, 3, 4, 4, gen=gen).to(device)
    eager = masks_and_cams(cam, A, G)
    compiled = torch.compile(masks_and_cams, fullgraph=True, backend=compile_backend)(cam, A, G)
    assert compiled[0].shape == (2, 1, 8, 8) and compiled[1].shape == (2, 8, 8)
    for a, b, n in zip(compiled, eager, ("dae_mask", "grad_cam")):
        assert_close(a, b, 0, 0, n)


@pytest.mark.parametrize("loss", ["cm", "cc", "dm", "cov"])
def test_double_backward_is_refused_not_wrong(loss):
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 3, 4, dtype=torch.float64)
    fn = {
        "cm": lambda: edfkern.covariance_matching_loss(x, r, syn_groups=2, real_groups=2),
        "cc": lambda: edfkern.class_centralization_loss(x, groups=2),
        "dm": lambda: edfkern.mean_matching_loss(x, r, syn_groups=2, real_groups=2),
        "cov": lambda: edfkern.local_covariance(x, groups=2).sum(),
    }[loss]
    (g,) = torch.autograd.grad(fn(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()
