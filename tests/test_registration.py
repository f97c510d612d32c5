"""torch.library registration: opcheck on every edfkern:: op, torch.compile(fullgraph=True) through DD steps."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import edfkern
import edfkern.ops.covariance  # noqa: F401
from tests._utils import assert_close, rand

ops = torch.ops.edfkern


def _groups(n, k, device):
    offsets = torch.arange(k + 1, device=device) * (n // k)
    return None, offsets


def _perm_groups(labels):
    from edfkern._checks import resolve_groups

    g = resolve_groups(labels, labels.numel(), labels.device)
    return g.perm, g.offsets


def opcheck_cases(device):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s, dt=torch.float32: rand(*s, dtype=dt, gen=gen).to(device)  # noqa: E731
    perm, offsets = _perm_groups(torch.tensor([1, 0, 2, 1, 0, 2], device=device))
    cases = {
        "dae_mask": (ops.dae_mask.default, (torch.rand(3, 4, 4, generator=gen).to(device), 1.0, None, 7, 9)),
        "dae_": (ops.dae_.default, (r(3, 2, 7, 9), torch.rand(3, 4, 4, generator=gen).to(device), 1.0, 0.3)),
        "dae_sgd_step_": (ops.dae_sgd_step_.default,
                          (r(3, 2, 7, 9), r(3, 2, 7, 9), r(3, 2, 7, 9), torch.rand(3, 4, 4, generator=gen).to(device),
                           10.0, 1.0, None, 0.5, 0.0, 0.0, False, False, False)),
        "grad_cam": (ops.grad_cam.default, (r(3, 5, 4, 4), r(3, 5, 4, 4), None, "gradcam++", True, [8, 8])),
        "grad_cam_smooth": (ops.grad_cam.default, (r(2, 3, 5, 4, 4), r(2, 3, 5, 4, 4), r(3, 5, 4, 4),
                                                   "smoothgradcam++", True, None)),
        "cpd_keep_mask": (ops.cpd_keep_mask.default, (r(50).abs(), 0.3)),
        "local_covariance": (ops.local_covariance.default, (r(6, 4, 3, dt=torch.float64).requires_grad_(), perm, offsets)),
        "covariance_matching_loss": (ops.covariance_matching_loss.default,
                                     (r(6, 4, 3, dt=torch.float64).requires_grad_(), None, _groups(6, 3, device)[1],
                                      r(6, 4, 3, dt=torch.float64), perm, offsets, 0.01)),
        "class_centralization_loss": (ops.class_centralization_loss.default,
                                      (r(6, 5, dt=torch.float64).requires_grad_(), perm, offsets, 0.05)),
        "mean_matching_loss": (ops.mean_matching_loss.default,
                               (r(6, 5, dt=torch.float64).requires_grad_(), perm, offsets, r(9, 5, dt=torch.float64),
                                None, _groups(9, 3, device)[1], 1.0)),
    }
    s, t, s0 = (r(40, dt=torch.float64) for _ in range(3))
    cases["cpd_trajectory_loss"] = (ops.cpd_trajectory_loss.default, (s.requires_grad_(), t, s0, 0.25))
    return cases


CASE_NAMES = list(opcheck_cases("cpu").keys())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(backend, device, name):
    op, args = opcheck_cases(device)[name]
    # gradients are checked separately with gradcheck; opcheck covers schema, fake tensors and autograd registration
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_every_public_op_is_registered():
    names = {"dae_mask", "dae_", "dae_sgd_step_", "grad_cam", "cpd_trajectory_loss", "cpd_trajectory_loss_backward",
             "cpd_keep_mask", "local_covariance", "covariance_backward", "covariance_matching_loss",
             "class_centralization_loss", "class_centralization_backward", "mean_matching_loss"}
    for n in names:
        assert hasattr(torch.ops.edfkern, n), n


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
