"""``edfkern.trajectory_matching_loss``: the unrolled student's exact gradient at constant memory.

Oracle: the authors' loop, :func:`edfkern.baselines.trajectory_matching_loop` (every step's graph kept),
on the same data, the same minibatch draws and the same augmentation draws. "Exact" is float64 to
1e-10 relative; float32 follows the project's tolerance rule (``tests/_utils.assert_fp_rule``).
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

import edfkern
from edfkern import baselines
from edfkern.trajectory import TrajectoryReplayError, last_call_profile, soft_cross_entropy

from tests._trajectory_cases import (DIST_CASES, assert_same_grads, dsa_like, grads, make_case, peak_rss_growth, rel)
from tests._utils import assert_fp_rule

GRID = list(itertools.product((1, 2, 7, 20), (4, 10), (False, True), (False, True), (0.0, 0.375), (None, 3)))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("steps,batch,aug,soft,drop,every", GRID,
                         ids=[f"S{s}-b{b}-{'dsa' if a else 'noaug'}-{'soft' if so else 'hard'}-drop{d}-ck{e}"
                              for s, b, a, so, d, e in GRID])
def test_float64_equals_the_unrolled_loop(steps, batch, aug, soft, drop, every):
    """Images, labels and syn_lr gradients within 1e-10 relative of the loop's; the loss too; and torch's
    RNG continues where the loop leaves it (the replayed augmentations draw nothing new)."""
    case = make_case(10, soft=soft)
    kw = dict(syn_steps=steps, batch_syn=batch, augment=dsa_like if aug else None, drop_ratio=drop)
    want = grads(case, "loop", **kw)
    got = grads(case, "constant", checkpoint_every=every, **kw)
    assert_same_grads(got, want, 1e-10, "constant vs loop")


def test_unrolled_mode_is_the_authors_loop():
    case = make_case(10, soft=True)
    kw = dict(syn_steps=3, batch_syn=4, augment=dsa_like, drop_ratio=0.25)
    assert_same_grads(grads(case, "unrolled", **kw), grads(case, "loop", **kw), 0.0, "unrolled vs loop")


def test_explicit_batches_generator_and_custom_loss():
    """Explicit index tensors (repeats and uneven sizes allowed), and a DATM-style soft cross-entropy."""
    case = make_case(9, soft=True)

    def soft_ce(inputs, target):  # EDF's SoftCrossEntropy (edf_distill.py, main), verbatim
        input_log_likelihood = -torch.nn.functional.log_softmax(inputs, dim=1)
        target_log_likelihood = torch.nn.functional.softmax(target, dim=1)
        return torch.sum(torch.mul(input_log_likelihood, target_log_likelihood)) / inputs.shape[0]

    batches = [torch.tensor([3, 1, 4, 1]), torch.tensor([5, 0, 8]), torch.arange(9), torch.tensor([2])]
    kw = dict(batches=batches, drop_ratio=0.5, augment=dsa_like)
    assert_same_grads(grads(case, "constant", loss_fn=soft_cross_entropy, **kw),
                      grads(case, "loop", syn_steps=4, loss_fn=soft_ce, **kw), 1e-10, "batches")
    gen_kw = lambda: dict(syn_steps=5, batch_syn=4, generator=torch.Generator().manual_seed(9))  # noqa: E731
    assert_same_grads(grads(case, "constant", **gen_kw()), grads(case, "loop", **gen_kw()), 1e-10, "generator")


def test_noncontiguous_inputs_and_float_syn_lr():
    case = make_case(10)
    wide = torch.randn(10, 3, 8, 16, dtype=torch.float64)[..., ::2]  # a strided view
    wide.copy_(case.images)
    p = case.start.numel()
    start2 = torch.empty(2 * p, dtype=torch.float64)[::2]
    start2.copy_(case.start)
    c2 = make_case(10)
    c2.images, c2.start = wide, start2
    kw = dict(syn_steps=3, batch_syn=6, augment=dsa_like, drop_ratio=0.375)
    assert_same_grads(grads(c2, "constant", **kw), grads(case, "loop", **kw), 1e-10, "non-contiguous")
    x = case.images.clone().requires_grad_(True)
    loss = edfkern.trajectory_matching_loss(case.student, x, case.labels, case.start, case.target, 0.05, syn_steps=2)
    loss.backward()
    x2 = case.images.clone().requires_grad_(True)
    baselines.trajectory_matching_loop(case.student, x2, case.labels, case.start, case.target,
                                       torch.tensor(0.05, dtype=torch.float64), syn_steps=2, batch_syn=10).backward()
    assert rel(x.grad, x2.grad) <= 1e-10


def test_float32_follows_the_tolerance_rule():
    """fp32 op vs the fp64 loop on the same (fp32-rounded) inputs, bar set by the plain fp32 loop."""
    c32 = make_case(10, soft=True, dtype=torch.float32, width=8)
    c64 = make_case(10, soft=True, dtype=torch.float32, width=8)
    c64.student.net.double()
    for name in ("start", "target", "images", "labels", "syn_lr"):
        setattr(c64, name, getattr(c32, name).double())
    kw = dict(syn_steps=6, batch_syn=5, augment=dsa_like, drop_ratio=0.375)
    got, plain, oracle = grads(c32, "constant", **kw), grads(c32, "loop", **kw), grads(c64, "loop", **kw)
    for k in ("images", "labels", "syn_lr"):
        assert got[1][k].dtype == torch.float32
        assert_fp_rule(got[1][k], oracle[1][k], plain[1][k], f"{k}.grad")
    assert_fp_rule(torch.tensor(got[0]), torch.tensor(oracle[0], dtype=torch.float64), torch.tensor(plain[0]), "loss")


def test_gradcheck_tiny():
    case = make_case(4, soft=True, width=2, depth=1)
    batches = [torch.tensor([0, 2]), torch.tensor([1, 3, 0])]

    def f(x, y, a):
        torch.manual_seed(11)  # the augmentation's draws, the same on every evaluation
        return edfkern.trajectory_matching_loss(case.student, x, y, case.start, case.target, a, batches=batches,
                                                augment=dsa_like, drop_ratio=0.25)

    inputs = (case.images.clone().requires_grad_(True), case.labels.clone().requires_grad_(True),
              case.syn_lr.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_only_requested_gradients_and_grad_scale():
    """Images without grad, labels with: only labels.grad; a non-unit upstream gradient scales all."""
    case = make_case(8, soft=True)
    y = case.labels.clone().requires_grad_(True)
    a = case.syn_lr.clone().requires_grad_(True)
    torch.manual_seed(0)
    loss = edfkern.trajectory_matching_loss(case.student, case.images, y, case.start, case.target, a, syn_steps=3,
                                            batch_syn=5)
    (3.0 * loss).backward()
    y2 = case.labels.clone().requires_grad_(True)
    a2 = case.syn_lr.clone().requires_grad_(True)
    torch.manual_seed(0)
    loss2 = baselines.trajectory_matching_loop(case.student, case.images, y2, case.start, case.target, a2,
                                               syn_steps=3, batch_syn=5)
    (3.0 * loss2).backward()
    assert case.images.grad is None
    assert rel(y.grad, y2.grad) <= 1e-10 and rel(a.grad, a2.grad) <= 1e-10


def test_special_values_come_out_as_the_loop_gives_them():
    """A NaN image: the loop's loss and gradients are NaN; so are the op's (the replay check passes NaN)."""
    case = make_case(8)
    case.images[3, 0, 2, 2] = float("nan")
    kw = dict(syn_steps=2, batch_syn=8)
    (lw, gw, _), (lg, gg, _) = grads(case, "loop", **kw), grads(case, "constant", **kw)
    assert np.isnan(lw) and np.isnan(lg)
    for k in ("images", "syn_lr"):
        assert torch.equal(gw[k].isnan(), gg[k].isnan()), k


def test_profile_reports_the_parts():
    case = make_case(8)
    x = case.images.clone().requires_grad_(True)
    edfkern.trajectory_matching_loss(case.student, x, case.labels, case.start, case.target, case.syn_lr,
                                     syn_steps=4, batch_syn=3, checkpoint_every=2).backward()
    p = last_call_profile()
    assert p.forward > 0 and p.replay > 0 and p.vjp > 0 and p.recompute > 0 and p.collectives == 0


# ----------------------------------------------------------------------------- the replay check


def test_dropout_in_the_student_raises_replay_error():
    case = make_case(8)
    drop = torch.nn.Dropout(0.5)

    def forward(w, x):
        return case.student(w, drop(x))

    x = case.images.clone().requires_grad_(True)
    loss = edfkern.trajectory_matching_loss(forward, x, case.labels, case.start, case.target, case.syn_lr,
                                            syn_steps=3, batch_syn=4)
    # dropout draws from torch's RNG *outside* the augmentation: the recomputed step differs
    with pytest.raises(TrajectoryReplayError, match=r"step 2 .*not deterministic.*dropout"):
        loss.backward()


def test_augmentation_from_another_rng_raises_replay_error():
    case = make_case(8)
    rs = np.random.RandomState(0)

    def numpy_aug(x):
        return x + 0.1 * torch.from_numpy(rs.randn(*x.shape))  # per pixel: a scale or shift would cancel in the instance norm

    x = case.images.clone().requires_grad_(True)
    loss = edfkern.trajectory_matching_loss(case.student, x, case.labels, case.start, case.target, case.syn_lr,
                                            syn_steps=2, augment=numpy_aug)
    with pytest.raises(TrajectoryReplayError, match="step 1"):
        loss.backward()


# ----------------------------------------------------------------------------- bad input


def _bad_calls():
    c = make_case(6, soft=True)
    ok = dict(forward=c.student, images=c.images, labels=c.labels, start=c.start, target=c.target,
              syn_lr=c.syn_lr, syn_steps=2)
    cases = {
        "forward": (dict(forward="net"), TypeError, "forward must be callable"),
        "start_target_P": (dict(target=c.target[:-1]), ValueError, "target must have start's size"),
        "start_2d": (dict(start=c.start[None]), ValueError, r"start must be a non-empty flat parameter vector"),
        "batch_out_of_range": (dict(syn_steps=None, batches=[torch.tensor([0, 6])]), ValueError,
                               r"batches\[0\] indexes rows \[0, 6\], outside images' \[0, 6\)"),
        "batch_negative": (dict(syn_steps=None, batches=[torch.tensor([1]), torch.tensor([-1])]), ValueError,
                           r"batches\[1\]"),
        "batch_float": (dict(syn_steps=None, batches=[torch.tensor([1.0])]), TypeError, "integer index tensor"),
        "batches_vs_steps": (dict(syn_steps=3, batches=[torch.tensor([1])]), ValueError, "one per step"),
        "syn_lr_vector": (dict(syn_lr=torch.ones(2, dtype=torch.float64)), ValueError, "syn_lr must be a scalar"),
        "syn_lr_nan": (dict(syn_lr=float("nan")), ValueError, "syn_lr must be finite"),
        "labels_N": (dict(labels=c.labels[:-1]), ValueError, r"\(N, K\) soft labels with N = 6"),
        "labels_hard_N": (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"\(N,\) with N = 6"),
        "labels_negative": (dict(labels=torch.tensor([0, 1, -1, 0, 1, 2])), ValueError, ">= 0"),
        "labels_too_big": (dict(labels=torch.tensor([0, 1, 9, 0, 1, 2])), ValueError, r"\[0, K\) with K = 4"),
        "drop_ratio_1": (dict(drop_ratio=1.0), ValueError, "drop_ratio"),
        "drop_ratio_neg": (dict(drop_ratio=-0.1), ValueError, "drop_ratio"),
        "memory": (dict(memory="low"), ValueError, "memory must be one of"),
        "checkpoint_0": (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
        "checkpoint_unrolled": (dict(checkpoint_every=2, memory="unrolled"), ValueError, "memory='constant' only"),
        "syn_steps_missing": (dict(syn_steps=None), ValueError, "syn_steps is required"),
        "syn_steps_0": (dict(syn_steps=0), ValueError, "syn_steps"),
        "batch_syn_0": (dict(batch_syn=0), ValueError, "batch_syn"),
        "images_int": (dict(images=torch.zeros(6, 3, 8, 8, dtype=torch.long)), TypeError, "images"),
        "augment": (dict(augment=3), TypeError, "augment must be callable"),
        "generator": (dict(generator=3), TypeError, "generator must be a torch.Generator"),
        "dtype_mix": (dict(target=c.target.float()), (TypeError, ValueError), "dtype"),
    }
    return ok, cases


@pytest.mark.parametrize("name", list(_bad_calls()[1]))
def test_bad_input_raises_before_any_work(name):
    ok, cases = _bad_calls()
    change, exc, msg = cases[name]
    calls = []

    def forward(w, x):
        calls.append(1)
        return ok["forward"](w, x)

    kw = {**ok, "forward": forward, **change}
    if name == "forward":
        kw["forward"] = change["forward"]
    args = [kw.pop(k) for k in ("forward", "images", "labels", "start", "target", "syn_lr")]
    with pytest.raises(exc, match=msg):
        edfkern.trajectory_matching_loss(*args, **kw)
    if name != "labels_too_big":  # K is known only from the first logits; nothing is kept or written
        assert not calls, "the student ran before the arguments were checked"


# ----------------------------------------------------------------------------- memory


def test_peak_memory_grows_by_at_most_a_quarter_of_the_loops():
    """Peak RSS, in fresh child processes, from syn_steps 4 to 24: the op's growth <= 1/4 of the loop's."""
    from edfkern.bench.memory import run_isolated

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc (VmHWM)")
    peak = {(m, s): run_isolated(peak_rss_growth, (m, s), timeout=600) for m in ("loop", "constant") for s in (4, 24)}
    loop = peak["loop", 24] - peak["loop", 4]
    const = peak["constant", 24] - peak["constant", 4]
    print(f"peak RSS growth 4 -> 24 steps: loop {loop / 2**20:.1f} MiB, constant {const / 2**20:.1f} MiB")
    assert loop > 20 * 2**20, f"the loop's graph should grow by tens of MiB, grew {loop / 2**20:.1f} MiB"
    assert const <= loop / 4, f"constant grew {const / 2**20:.1f} MiB, more than a quarter of the loop's"


# ----------------------------------------------------------------------------- process groups


@pytest.mark.parametrize("world", [2, 3])
def test_process_group_gives_the_one_process_gradient(world):
    from tests._dist_launch import run_world

    res = run_world(world, deadline_s=300.0, collective_timeout_s=90.0, script="_trajectory_cases.py")
    assert set(res) == set(DIST_CASES) | {"rng_disagreement", "train_batchnorm"}
    for name, per_rank in res.items():
        assert per_rank == ["ok"] * world, f"{name}: {per_rank}"


def test_docs_trajectory_blocks_run():
    """docs/trajectory.md's ```python examples run as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "trajectory.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 2
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(doc), "exec"), ns)
    assert ns["image_syn"].grad is not None and ns["syn_lr"].grad is not None
