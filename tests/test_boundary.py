"""The one checked boundary: the registered op checks, the public function converts.

A direct call of a registered op is refused with the public function's message; the fakes check
what needs no tensor values (so meta tensors and dynamic shapes trace); the public functions' own
conversions do not change what reaches the kernels.
"""
from __future__ import annotations

import pytest
import torch

import edfkern


def _message(fn) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("case", ["dae_-cam-N", "dae_mask-cam-rank", "cpd-shape", "cpd-ratio", "cm-dtype"])
def test_direct_call_gets_the_public_message(case):
    """The public function and the registered op raise the same error: the rule has one home."""
    g, cam = torch.randn(4, 2, 6, 5), torch.rand(3, 3, 3)
    s, t = torch.randn(20), torch.randn(19)
    x, xd = torch.randn(6, 2, 3), torch.randn(6, 2, 3, dtype=torch.float64)
    off = torch.tensor([0, 3, 6])
    public, direct = {
        "dae_-cam-N": (lambda: edfkern.dae_(g, cam, beta=1.0), lambda: torch.ops.edfkern.dae_(g, cam, 1.0, None)),
        "dae_mask-cam-rank": (lambda: edfkern.dae_mask(cam[0], beta=1.0),
                              lambda: torch.ops.edfkern.dae_mask(cam[0], 1.0, None, 3, 3)),
        "cpd-shape": (lambda: edfkern.cpd_trajectory_loss(s, t, s, drop_ratio=0.5),
                      lambda: torch.ops.edfkern.cpd_trajectory_loss(s, t, s, 0.5)),
        "cpd-ratio": (lambda: edfkern.cpd_trajectory_loss(s, s, s, drop_ratio=1.0),
                      lambda: torch.ops.edfkern.cpd_trajectory_loss(s, s, s, 1.0)),
        "cm-dtype": (lambda: edfkern.covariance_matching_loss(x, xd, syn_groups=2, real_groups=2),
                     lambda: torch.ops.edfkern.covariance_matching_loss(x, None, off, xd, None, off, 1.0)),
    }[case]
    assert _message(public) == _message(direct)


def test_dae_mask_traces_with_dynamic_shapes():
    """The fake checks the CAM only: ``H`` and ``W`` are SymInts under ``dynamic=True``, neither refused
    nor pinned (one graph for both shapes)."""
    from torch._dynamo.testing import CompileCounter

    count = CompileCounter()
    fn = torch.compile(lambda c: edfkern.dae_mask(c, beta=0.5), dynamic=True, fullgraph=True, backend=count)
    cam = torch.rand(3, 4, 5)
    torch.testing.assert_close(fn(cam), edfkern.dae_mask(cam, beta=0.5))
    cam2 = torch.rand(2, 6, 3)
    torch.testing.assert_close(fn(cam2), edfkern.dae_mask(cam2, beta=0.5))
    assert count.frame_count == 1, f"{count.frame_count} graphs for 2 shapes: a size was pinned"


def test_fakes_check_meta_inputs():
    """Meta tensors reach the fakes, which refuse a wrong shape as the op would."""
    with pytest.raises(ValueError, match="cam must have N=4 maps"):
        edfkern.dae_(torch.empty(4, 2, 6, 5, device="meta"), torch.empty(3, 3, 3, device="meta"), beta=1.0)
    with pytest.raises(ValueError, match="real must have the same"):
        edfkern.mean_matching_loss(torch.empty(4, 3, device="meta"), torch.empty(4, 5, device="meta"),
                                   syn_groups=2, real_groups=2)
    out = edfkern.dae_mask(torch.empty(3, 4, 4, device="meta"), beta=1.0, size=(8, 8))
    assert out.shape == (3, 1, 8, 8) and out.device.type == "meta"


def test_unused_momentum_buffer_is_untouched():
    """With ``momentum == 0`` the buffer is not handed to the op, so it is neither written nor versioned."""
    p, g, cam = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(2, 2, 2)
    buf = torch.randn(2, 3, 4, 4)
    before, version = buf.clone(), buf._version
    edfkern.dae_sgd_step_(p, g, buf, cam, lr=0.1, beta=1.0, momentum=0.0)
    assert torch.equal(buf, before) and buf._version == version


def test_empty_keep_mask_matches_its_fake():
    """An empty ``l`` gives a contiguous bool tensor, as the fake says, whatever ``l``'s strides."""
    l = torch.randn(0, 3).t()
    out = edfkern.cpd_keep_mask(l, 0.5)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.edfkern.cpd_keep_mask(mode.from_tensor(l), 0.5)
    assert out.shape == fake.shape == l.shape and out.stride() == fake.stride() and out.dtype == torch.bool


def test_grad_cam_traces_with_dynamic_shapes():
    """The fake checks the tensors only: under ``dynamic=True`` N, h, w and an output ``size`` taken
    from an image's shape are SymInts, which must neither be refused nor pinned (one graph for all)."""
    from torch._dynamo.testing import CompileCounter

    count = CompileCounter()
    fn = torch.compile(lambda a, g, img: edfkern.grad_cam(a, g, size=img.shape[-2:]), dynamic=True,
                       fullgraph=True, backend=count)
    # the first call's sizes all differ, so no two share a symbol (dynamo's duck sizing)
    for n, h, size in [(2, 3, (8, 10)), (3, 4, (16, 12)), (5, 5, (24, 9))]:
        a, g = torch.randn(n, 7, h, h + 3), torch.randn(n, 7, h, h + 3)
        torch.testing.assert_close(fn(a, g, torch.empty(1, *size)), edfkern.grad_cam(a, g, size=size))
    assert count.frame_count == 1, f"{count.frame_count} graphs for 3 shapes: a size was pinned"


@pytest.mark.parametrize("op, side", [("mean_matching_loss", "syn"), ("mean_matching_loss", "real"),
                                      ("covariance_matching_loss", "syn"), ("covariance_matching_loss", "real"),
                                      ("class_centralization_loss", "feat")])
def test_direct_loss_call_refuses_an_empty_group(op, side):
    """A loss over an empty group is 0/0: the public functions refuse it, and so does the op itself
    (it returned a finite, wrong value when called directly)."""
    x = torch.randn(4, 2, 3) if op == "covariance_matching_loss" else torch.randn(4, 3)
    full, empty = torch.tensor([0, 2, 4]), torch.tensor([0, 4, 4])
    fn = getattr(torch.ops.edfkern, op)
    if op == "class_centralization_loss":
        call = lambda: fn(x, None, empty, 1.0)
    else:
        so, ro = (empty, full) if side == "syn" else (full, empty)
        call = lambda: fn(x, None, so, x + 1, None, ro, 1.0)
    with pytest.raises(ValueError, match="every group of a loss needs at least one row"):
        call()
