"""DAESGD: exactly torch.optim.SGD without CAMs; "grad *= mask, then SGD" with them."""
import copy
import io
import itertools

import pytest
import torch

import edfkern.baselines as B
from edfkern.optim import DAESGD

SGD_ARGS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product([0.0, 0.5, 0.9], [0.0, 0.3], [0.0, 1e-2], [False, True], [False, True])
    if not (n and (m == 0 or d != 0))
]


def _ids(args):
    return "-".join(f"{k}={v}" for k, v in args.items())


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 6, 5), (7, 3), (5,)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def fake_grads(params, step, seed=0, skip=None):
    g = torch.Generator().manual_seed(1000 + seed * 100 + step)
    for i, p in enumerate(params):
        p.grad = None if skip is not None and i == skip else torch.randn(p.shape, generator=g, dtype=p.dtype)


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def assert_equal(a, b, what=""):
    assert a.shape == b.shape
    if not torch.equal(a, b):
        bad = (a != b)
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} differ; first at {idx}: "
                             f"{float(a[idx])} vs {float(b[idx])}")


# ----------------------------------------------------------------------------- no CAM: exactly SGD


@pytest.mark.parametrize("args", SGD_ARGS, ids=_ids)
def test_equals_torch_sgd_without_cam(args):
    p_ref, p_dae = make_params(), make_params()
    ref = torch.optim.SGD(p_ref, lr=0.1, **args)
    dae = DAESGD(p_dae, lr=0.1, **args)
    for step in range(4):
        skip = 1 if step == 2 else None  # a parameter without grad on one step
        fake_grads(p_ref, step, skip=skip)
        fake_grads(p_dae, step, skip=skip)
        ref.step()
        dae.step()
        for i, (a, b) in enumerate(zip(p_ref, p_dae)):
            assert_equal(b.detach(), a.detach(), f"param {i} step {step}")
            if args["momentum"] != 0:
                assert_equal(dae.state[b]["momentum_buffer"], ref.state[a]["momentum_buffer"], f"buffer {i}")
            else:
                assert "momentum_buffer" not in dae.state.get(b, {})


def test_equals_torch_sgd_param_groups_and_closure():
    p_ref, p_dae = make_params(), make_params()
    ref = torch.optim.SGD([{"params": p_ref[:1], "lr": 0.5}, {"params": p_ref[1:]}], lr=0.1, momentum=0.5)
    dae = DAESGD([{"params": p_dae[:1], "lr": 0.5}, {"params": p_dae[1:]}], lr=0.1, momentum=0.5)
    for step in range(3):
        def closure(ps):
            def f():
                loss = sum((p ** 2).sum() for p in ps)
                for p in ps:
                    p.grad = None
                loss.backward()
                return loss
            return f
        la, lb = ref.step(closure(p_ref)), dae.step(closure(p_dae))
        assert torch.equal(la, lb)
    for a, b in zip(p_ref, p_dae):
        assert_equal(b.detach(), a.detach())


# ----------------------------------------------------------------------------- with CAM: mask, then SGD


def edf_loop_step(img, opt, cam, beta, threshold):
    """EDF's lines: ``image_syn.grad *= create_soft_mask(...)`` then ``optimizer_img.step()``."""
    img.grad *= B.create_soft_mask(cam.reshape(cam.shape[0], *cam.shape[-2:]), tuple(img.shape[-2:]), beta, threshold)
    opt.step()


@pytest.mark.parametrize("args", [a for a in SGD_ARGS if a["dampening"] == 0], ids=_ids)
@pytest.mark.parametrize("beta,threshold", [(1.0, None), (2.0, 0.4)])
def test_with_cam_equals_mask_then_sgd(args, beta, threshold):
    torch.manual_seed(0)
    img0 = torch.randn(5, 3, 12, 12)
    cams = [torch.rand(5, 3, 3), torch.rand(5, 1, 3, 3)]
    img_loop = img0.clone().requires_grad_()
    img_dae = img0.clone().requires_grad_()
    img_base = img0.clone()
    buf_base = torch.empty_like(img0)
    opt_loop = torch.optim.SGD([img_loop], lr=100.0, **args)
    opt_dae = DAESGD([img_dae], lr=100.0, beta=beta, threshold=threshold, **args)
    for step in range(4):
        grad = torch.randn_like(img0) * 1e-3
        cam = cams[step // 2]  # refreshed every 2 steps, as EDF refreshes every `interval`
        img_loop.grad = grad.clone()
        img_dae.grad = grad.clone()
        edf_loop_step(img_loop, opt_loop, cam, beta, threshold)
        if step % 2 == 0:
            opt_dae.set_cam(img_dae, cam)
        opt_dae.step()
        B.dae_sgd_step_(img_base, grad, buf_base, cam.reshape(5, 3, 3), lr=100.0, beta=beta, threshold=threshold,
                        first_step=step == 0, **args)
        assert torch.equal(img_dae.grad, grad)  # .grad is left untouched
        torch.testing.assert_close(img_dae.detach(), img_loop.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(img_dae.detach(), img_base, rtol=1e-5, atol=1e-6)
        if args["momentum"] != 0:
            torch.testing.assert_close(opt_dae.state[img_dae]["momentum_buffer"],
                                       opt_loop.state[img_loop]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_cam_forms_and_mixed_params():
    """CAM by index / mapping / list / single tensor; params without CAM in the same group stay plain SGD."""
    torch.manual_seed(1)
    cam = torch.rand(4, 2, 2)
    results = []
    for form in ("set_index", "set_param", "map_param", "map_index", "list"):
        params = make_params(seed=3)
        opt = DAESGD(params, lr=0.5, momentum=0.5)
        ref_params = make_params(seed=3)
        ref = torch.optim.SGD(ref_params[1:], lr=0.5, momentum=0.5)
        for step in range(2):
            fake_grads(params, step)
            fake_grads(ref_params, step)
            if form == "set_index":
                opt.set_cam(0, cam)
                opt.step()
            elif form == "set_param":
                opt.set_cam(params[0], cam)
                opt.step()
            elif form == "map_param":
                opt.step(cams={params[0]: cam})
            elif form == "map_index":
                opt.step(cams={0: cam})
            else:
                opt.step(cams=[cam, None, None])
            ref.step()
        for a, b in zip(ref_params[1:], params[1:]):
            assert_equal(b.detach(), a.detach(), form)
        results.append(params[0].detach().clone())
    for r in results[1:]:
        assert_equal(r, results[0])
    # step(cams=...) is for one step only; set_cam persists until cleared
    p = torch.zeros(4, 1, 2, 2, requires_grad=True)
    opt = DAESGD([p], lr=1.0)
    p.grad = torch.ones_like(p)
    opt.step(cams=torch.ones(4, 2, 2))  # mask = 1 + beta = 2 everywhere
    assert torch.equal(p.detach(), torch.full_like(p, -2.0))
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, -3.0))
    opt.set_cam(p, torch.ones(4, 2, 2))
    opt.step()
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, -7.0))
    stored = opt.get_cam(0)
    assert stored is not None and torch.equal(stored.reshape(4, 2, 2), torch.ones(4, 2, 2))
    assert opt.get_cam(p) is stored  # by index or by parameter: the same CAM
    opt.set_cam(0, None)
    assert opt.get_cam(0) is None
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, -8.0))


# ----------------------------------------------------------------------------- state_dict



def step_together(a, b, steps) -> None:
    """Give two (params, optimizer) pairs the same fake gradients for ``steps`` and assert that
    their parameters stay bit-identical."""
    for step in steps:
        for params, opt in (a, b):
            fake_grads(params, step)
            opt.step()
    for x, y in zip(a[0], b[0]):
        assert_equal(y.detach(), x.detach())

def test_state_dict_round_trip():
    cam = torch.rand(4, 3, 3)
    params = make_params(seed=5)
    opt = DAESGD(params, lr=0.2, momentum=0.9, weight_decay=1e-3, nesterov=True, beta=2.0, threshold=0.3)
    opt.set_cam(0, cam)
    for step in range(3):
        fake_grads(params, step)
        opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"][0].keys()) == ["momentum_buffer"]  # SGD's layout, nothing else
    assert sd["param_groups"][0]["beta"] == 2.0 and sd["param_groups"][0]["threshold"] == 0.3
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = DAESGD(params2, lr=1.0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["lr"] == 0.2 and opt2.param_groups[0]["beta"] == 2.0
    opt2.set_cam(0, cam)  # CAMs are inputs, not state
    step_together((params, opt), (params2, opt2), steps=range(3, 5))


def test_state_dict_interchange_with_sgd():
    params = make_params(seed=6)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.5)
    for step in range(2):
        fake_grads(params, step)
        sgd.step()
    p_dae = clone_params(params)
    p_sgd = clone_params(params)
    dae = DAESGD(p_dae, lr=0.1, momentum=0.5)
    dae.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert dae.param_groups[0]["beta"] == 1.0 and dae.param_groups[0]["threshold"] is None
    sgd2 = torch.optim.SGD(p_sgd, lr=0.1, momentum=0.5)
    sgd2.load_state_dict(copy.deepcopy(dae.state_dict()))  # torch shares buffers otherwise
    step_together((p_sgd, sgd2), (p_dae, dae), steps=range(2, 4))


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments():
    p = [torch.zeros(2, 3, 4, 4, requires_grad=True), torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        DAESGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        DAESGD(p, lr=0.1, momentum=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        DAESGD(p, lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="nesterov"):
        DAESGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        DAESGD(p, lr=0.1, momentum=0.5, dampening=0.1, nesterov=True)
    with pytest.raises(TypeError, match="beta"):
        DAESGD(p, lr=0.1, beta="1")
    with pytest.raises(ValueError, match="threshold"):
        DAESGD(p, lr=0.1, threshold=float("nan"))
    opt = DAESGD(p, lr=0.1, momentum=0.5)
    with pytest.raises(ValueError, match="N=2"):
        opt.set_cam(0, torch.rand(3, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        opt.set_cam(1, torch.rand(3, 2, 2))
    with pytest.raises(TypeError, match="floating"):
        opt.set_cam(0, torch.ones(2, 2, 2, dtype=torch.long))
    with pytest.raises(IndexError):
        opt.set_cam(5, torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_cam(torch.zeros(2, 3, 4, 4), torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="one entry per parameter"):
        opt.step(cams=[torch.rand(2, 2, 2)])
    with pytest.raises(ValueError, match="single tensor"):
        opt.step(cams=torch.rand(2, 2, 2))
    with pytest.raises(TypeError, match="cams"):
        opt.step(cams=3)
    # a bad CAM in step() raises before anything is written
    p[0].grad = torch.ones_like(p[0])
    p[1].grad = torch.ones_like(p[1])
    before = [x.detach().clone() for x in p]
    with pytest.raises(ValueError):
        opt.step(cams={0: torch.rand(5, 2, 2)})
    for a, b in zip(before, p):
        assert torch.equal(a, b.detach())
    assert len(opt.state) == 0


# ----------------------------------------------------------------------------- all or nothing


def _two_group_setup(momentum=0.5):
    """Two groups, each with an image parameter under a CAM and a plain one; grads set."""
    g = torch.Generator().manual_seed(7)
    imgs = [torch.randn(3, 2, 6, 6, generator=g).requires_grad_() for _ in range(2)]
    plain = [torch.randn(5, generator=g).requires_grad_() for _ in range(2)]
    opt = DAESGD([{"params": [imgs[0], plain[0]]}, {"params": [imgs[1], plain[1]], "lr": 0.3}], lr=0.1,
                 momentum=momentum)
    for p in imgs + plain:
        p.grad = torch.randn(p.shape, generator=g)
    cams = [torch.rand(3, 2, 2, generator=g) for _ in range(2)]
    opt.set_cam(imgs[0], cams[0])
    opt.set_cam(imgs[1], cams[1])
    return opt, imgs + plain, cams


def _break_lr(opt, params, cams):
    opt.param_groups[1]["lr"] = -1.0


def _break_momentum(opt, params, cams):
    opt.param_groups[1]["momentum"] = float("nan")


def _break_beta(opt, params, cams):
    opt.param_groups[1]["beta"] = "junk"


def _break_threshold(opt, params, cams):
    opt.param_groups[1]["threshold"] = 10**400


def _break_nesterov(opt, params, cams):
    opt.param_groups[1]["nesterov"] = "yes"


def _empty_cam(opt, params, cams):
    return {"cams": {params[1]: torch.rand(3, 0, 2)}}


def _empty_cam_w(opt, params, cams):
    return {"cams": [None, None, torch.rand(3, 2, 0), None]}


def _cam_wrong_n(opt, params, cams):
    return {"cams": {1: torch.rand(2, 2, 2)}}


def _cam_is_param(opt, params, cams):
    return {"cams": {params[1]: params[1].detach()[:, 0]}}


def _bad_loaded_buffer_shape(opt, params, cams):
    opt.state[params[1]]["momentum_buffer"] = torch.zeros(3, 2, 6, 5)


def _bad_loaded_buffer_type(opt, params, cams):
    opt.state[params[3]]["momentum_buffer"] = "junk"


def _loaded_buffer_is_param(opt, params, cams):
    opt.state[params[1]]["momentum_buffer"] = params[1].detach()


def _cam_integer(opt, params, cams):
    return {"cams": {params[1]: torch.ones(3, 2, 2, dtype=torch.long)}}


BREAKERS = [_break_lr, _break_momentum, _break_beta, _break_threshold, _break_nesterov, _empty_cam, _empty_cam_w,
            _cam_wrong_n, _cam_is_param, _bad_loaded_buffer_shape, _bad_loaded_buffer_type, _loaded_buffer_is_param,
            _cam_integer]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__.strip("_") for b in BREAKERS])
def test_daesgd_all_or_nothing(breaker):
    """A step rejected for any group, CAM or state writes nothing; fixing the cause and retrying equals one clean step."""
    opt, params, cams = _two_group_setup()
    clean, clean_params, _ = _two_group_setup()
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    kwargs = breaker(opt, params, cams) or {}
    state_before = {id(p): dict(s) for p, s in opt.state.items()}
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, TypeError)):
        opt.step(**kwargs)
    for i, (a, p) in enumerate(zip(before, params)):
        assert torch.equal(a, p.detach()), f"parameter {i} was written by a rejected step"
    assert {id(p): dict(s) for p, s in opt.state.items()} == state_before, "state changed by a rejected step"
    # retry after undoing the cause: exactly one clean step, no stale (uninitialised) buffer
    for g, saved in zip(opt.param_groups, groups_before):
        g.update(saved)
    for p in params:
        opt.state.pop(p, None)
    params[1].grad = clean_params[1].grad.clone()
    opt.step()
    clean.step()
    for i, (a, b) in enumerate(zip(params, clean_params)):
        assert_equal(a.detach(), b.detach(), f"param {i} after retry")
        assert_equal(opt.state[a]["momentum_buffer"], clean.state[b]["momentum_buffer"], f"buffer {i} after retry")


def test_daesgd_rejected_first_step_leaves_no_buffer():
    """The bug class behind 'a retry is off by 1e16': a failed first step must not store an empty buffer."""
    for bad in ({0: torch.rand(3, 2, 0)}, {0: torch.rand(4, 2, 2)}, {0: torch.ones(3, 2, 2, dtype=torch.long)}):
        opt, params, cams = _two_group_setup()
        with pytest.raises((ValueError, TypeError)):
            opt.step(cams=bad)
        assert len(opt.state) == 0
        clean, clean_params, _ = _two_group_setup()
        opt.step()
        clean.step()
        for a, b in zip(params, clean_params):
            assert_equal(a.detach(), b.detach(), "retry")


@pytest.mark.parametrize("group,exc", [
    ({"lr": -1.0}, ValueError), ({"lr": torch.tensor(0.1)}, TypeError), ({"momentum": -0.5}, ValueError),
    ({"momentum": "0.5"}, TypeError), ({"weight_decay": float("inf")}, ValueError), ({"beta": "x"}, TypeError),
    ({"beta": 10**400}, ValueError), ({"threshold": "mean"}, TypeError), ({"nesterov": "yes"}, TypeError),
    ({"nesterov": True, "momentum": 0.0}, ValueError), ({"maximize": "no"}, TypeError),
    ({"dampening": float("nan")}, ValueError),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]!r}"[:20] for k in v))
def test_daesgd_add_param_group_validated_like_constructor(group, exc):
    p0 = torch.zeros(2, 3, 4, 4, requires_grad=True)
    opt = DAESGD([p0], lr=0.1, momentum=0.5)
    with pytest.raises(exc):
        DAESGD([torch.zeros(3, requires_grad=True)], **{"lr": 0.1, "momentum": 0.5, **group})
    with pytest.raises(exc):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **group})
    assert len(opt.param_groups) == 1
    # and the same value edited into an existing group is refused at the next step, writing nothing
    p0.grad = torch.ones_like(p0)
    for k, v in group.items():
        opt.param_groups[0][k] = v
    with pytest.raises(exc):
        opt.step()
    assert torch.equal(p0.detach(), torch.zeros_like(p0)) and len(opt.state) == 0


def test_daesgd_accepts_numpy_hyper_parameters():
    import numpy as np

    p_ref, p_np = make_params(seed=9), make_params(seed=9)
    ref = DAESGD(p_ref, lr=0.25, momentum=0.5, beta=2.0)
    opt = DAESGD(p_np, lr=np.float32(0.25), momentum=np.float64(0.5), beta=np.int64(2), maximize=np.bool_(False))
    fake_grads(p_ref, 0)
    fake_grads(p_np, 0)
    ref.step()
    opt.step()
    for a, b in zip(p_ref, p_np):
        assert_equal(b.detach(), a.detach())
