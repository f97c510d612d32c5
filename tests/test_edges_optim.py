"""Issue 20, class 4: DAESGD's stored CAMs belong to a parameter object, never to its ``id()``.

CPython reuses the address (the ``id``) of a freed object for the next object of the same size, so
a CAM keyed by ``id(param)`` passes to whichever tensor is allocated next at that address: a
parameter that was never given a CAM then takes a masked step instead of ``torch.optim.SGD``'s.
The tests force that reuse (free the parameter, allocate tensors until one has the old id, bounded)
and check the new parameter steps exactly like ``torch.optim.SGD``; they also check that a freed
parameter releases its CAM and that copies and ``load_state_dict`` keep CAMs on the right parameters.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import gc
import io
import weakref
from typing import Iterator, Optional

import pytest
import torch

from edfkern.optim import DAESGD

SHAPE = (4, 3, 8, 8)  # (N, C, H, W) image parameter


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).requires_grad_()


def _cam(seed: int) -> torch.Tensor:
    """(N, h, w) CAM far from uniform, so a masked step differs clearly from a plain one."""
    g = torch.Generator().manual_seed(100 + seed)
    return torch.rand(SHAPE[0], 4, 4, generator=g) * 3


def _grads(seed: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(steps)]


def _tensor_with_id(target: int, tries: int = 5000) -> Optional[torch.Tensor]:
    """A new (N, C, H, W) tensor whose ``id`` is ``target`` (the address of a freed one), or None.

    Whether CPython hands the freed address out again depends on its allocator's state (which pool
    the freed block sits in, what the earlier tests left behind), so this can fail on a given run.
    """
    keep = []  # held until the loop ends, so each try gets a fresh address
    for _ in range(tries):
        t = torch.empty(SHAPE)
        if id(t) == target:
            return t
        keep.append(t)
    return None


@contextlib.contextmanager
def _ids_collide(new: torch.Tensor, old_id: int) -> Iterator[None]:
    """Inside the block ``id(new) == old_id``, for every caller: the address reuse, forced.

    Used when the allocator would not reuse the address; an optimizer that keys CAMs by ``id``
    finds the old CAM for ``new`` exactly as it would after a real reuse.
    """
    real_id = builtins.id

    def colliding_id(obj: object) -> int:
        return old_id if obj is new else real_id(obj)

    builtins.id = colliding_id
    try:
        yield
    finally:
        builtins.id = real_id


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("how", ["replace_in_group", "new_group"])
def test_cam_is_not_inherited_through_id_reuse(how, momentum):
    """A parameter given a CAM is replaced and freed; a new tensor at the same address, never given
    a CAM, must step exactly like torch.optim.SGD (with ids it took the old CAM: |diff| up to ~1e3)."""
    kw = dict(lr=100.0, momentum=momentum)  # EDF's lr_img scale
    holder = [_image(0)]
    opt = DAESGD(holder, **kw)
    opt.set_cam(0, _cam(0))
    old_id, old_ref = id(holder[0]), weakref.ref(holder[0])
    if how == "replace_in_group":
        opt.param_groups[0]["params"].clear()
    else:
        opt.param_groups.clear()
    holder.clear()
    gc.collect()
    assert old_ref() is None, "the optimizer keeps the replaced parameter alive"
    new = _tensor_with_id(old_id)
    reused = new is not None
    if not reused:  # the allocator kept the address: force the collision instead of skipping
        new = torch.empty(SHAPE)
    new.copy_(_image(1).detach()).requires_grad_()
    if how == "replace_in_group":
        opt.param_groups[0]["params"].append(new)
    else:
        opt.add_param_group({"params": [new]})

    ref_p = new.detach().clone().requires_grad_()
    ref = torch.optim.SGD([ref_p], **kw)
    for step, g in enumerate(_grads(0, 3)):
        new.grad, ref_p.grad = g.clone(), g.clone()
        with contextlib.nullcontext() if reused else _ids_collide(new, old_id):
            opt.step()
        ref.step()
        diff = float((new.detach() - ref_p.detach()).abs().max())
        assert diff == 0.0, f"step {step}: DAESGD differs from torch.optim.SGD by {diff} on a parameter with no CAM"
    with contextlib.nullcontext() if reused else _ids_collide(new, old_id):
        assert opt.get_cam(new) is None


def test_forced_id_collision_is_seen_by_an_id_keyed_store():
    """The forced collision above is a real one: a dict keyed by ``id`` gives ``new`` the old value."""
    old = torch.empty(SHAPE)
    by_id = {id(old): "old CAM"}
    old_id = id(old)
    new = torch.empty(SHAPE)
    with _ids_collide(new, old_id):
        assert by_id.get(id(new)) == "old CAM"
    assert id(new) != old_id  # and the patch is undone


def test_a_freed_parameter_releases_its_cam():
    """The stored CAM holds its parameter weakly: replacing and dropping it frees both."""
    holder = [_image(0)]
    opt = DAESGD(holder, lr=1.0)
    cam = _cam(0)
    opt.set_cam(0, cam)
    p_ref, cam_ref = weakref.ref(holder[0]), weakref.ref(opt.get_cam(0))
    del cam
    opt.param_groups[0]["params"] = [_image(1)]
    holder.clear()
    gc.collect()
    assert p_ref() is None, "the optimizer keeps a replaced parameter alive"
    assert cam_ref() is None, "the optimizer keeps a replaced parameter's CAM alive"
    assert len(opt._cams) == 0


def test_a_removed_parameter_keeps_its_cam_to_itself():
    """A parameter taken out of the optimizer (still alive) keeps its CAM; the others step as SGD."""
    p, q = _image(0), _image(1)
    opt = DAESGD([p, q], lr=10.0, momentum=0.5)
    opt.set_cam(p, _cam(0))
    opt.param_groups[0]["params"] = [q]
    q_ref = q.detach().clone().requires_grad_()
    ref = torch.optim.SGD([q_ref], lr=10.0, momentum=0.5)
    for g in _grads(1, 2):
        q.grad, q_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.equal(q.detach(), q_ref.detach())
    opt.param_groups[0]["params"] = [p, q]  # back in: the CAM given to p is p's again
    assert opt.get_cam(p) is not None and opt.get_cam(q) is None


def _run(opt: DAESGD, grads: list[torch.Tensor]) -> torch.Tensor:
    (p,) = opt.param_groups[0]["params"]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().clone()


def _stepped_with_cam() -> DAESGD:
    opt = DAESGD([_image(0)], lr=10.0, momentum=0.5)
    opt.set_cam(0, _cam(0))
    _run(opt, _grads(2, 2))
    return opt


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_carries_the_cams_to_its_own_parameters(how):
    """deepcopy / pickling used to fail at the next step (AttributeError: no ``_cams``); the copy
    keeps the CAM, on its own copy of the parameter, and steps exactly like the original."""
    opt = _stepped_with_cam()
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    (p,), (p2,) = opt.param_groups[0]["params"], twin.param_groups[0]["params"]
    assert p2 is not p and torch.equal(twin.get_cam(0), opt.get_cam(0))
    assert torch.equal(_run(twin, _grads(3, 2)), _run(opt, _grads(3, 2)))


def test_load_state_dict_keeps_cams_on_the_same_parameters():
    """CAMs are inputs, not state: ``state_dict`` has none and ``load_state_dict`` keeps the stored
    ones. Resuming from a state dict with the same CAM continues bit for bit."""
    opt = _stepped_with_cam()
    sd = copy.deepcopy(opt.state_dict())
    assert "cams" not in sd and all("cam" not in str(k) for g in sd["param_groups"] for k in g)

    (p,) = opt.param_groups[0]["params"]
    resumed = DAESGD([p.detach().clone().requires_grad_()], lr=10.0, momentum=0.5)
    resumed.set_cam(0, opt.get_cam(0).clone())
    resumed.load_state_dict(sd)
    assert resumed.get_cam(0) is not None, "load_state_dict dropped the stored CAM"
    assert torch.equal(_run(resumed, _grads(4, 2)), _run(opt, _grads(4, 2)))

    plain = torch.optim.SGD([torch.zeros(SHAPE, requires_grad=True)], lr=10.0, momentum=0.5)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))  # and the state dict moves to SGD unchanged
    assert set(plain.state_dict()["state"][0]) == {"momentum_buffer"}
