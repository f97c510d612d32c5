"""Trajectory matching at constant memory: the unrolled student's exact gradient without its graph.

MTT, DATM and EDF train a student from the expert's parameters ``w_0 = start`` for ``S`` SGD steps
on the synthetic set and match the expert's later parameters (SPEC section 11, docs/trajectory.md)::

    g_i     = grad_w loss_fn(forward(w_i, A_i(X[b_i])), Y[b_i])
    w_{i+1} = w_i - a * g_i                              a = syn_lr, learnable
    L       = CPD(w_S, target, start)                    drop_ratio = 0: MTT's sum l / sum d

The authors' loop keeps every step's double-backward graph (``create_graph=True``), so its memory
grows with ``S * batch_syn``. Here the forward runs one step at a time without keeping graphs, and
the backward walks the steps in reverse (reverse-mode adjoint, ``lam = dL/dw_{i+1}``)::

    recompute g_i at (w_i, batch b_i), A_i replayed from its saved RNG state, with create_graph
    (H_i lam, J_X^T lam, J_Y^T lam) = one vector-Jacobian product of g_i with lam
    dX += -a J_X^T lam;   dY += -a J_Y^T lam;   da += -g_i . lam;   lam -= a H_i lam

which is backpropagation through the unrolled graph, reordered: equal to it to round-off. Memory is
one step's double-backward graph plus the ``S`` parameter vectors (``S/k + k`` with
``checkpoint_every=k``); time is about one extra forward and backward per step.

Layout, top-down: the public op and its checks; :class:`_Plan` (everything a call fixes: batches,
RNG states, sharding); the one home of a step's loss (:meth:`_Plan.step_loss`); the forward and the
reverse sweep (:class:`_ConstantMemory`); process groups.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as C
from . import baselines
from .distributed import _comm
from .distributed._agree import op_call
from .ops.cpd import cpd_trajectory_loss

__all__ = ["trajectory_matching_loss", "soft_cross_entropy", "TrajectoryReplayError", "last_call_profile"]

Forward = Callable[[Tensor, Tensor], Tensor]
Augment = Callable[[Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

MEMORY_MODES = ("constant", "unrolled")


class TrajectoryReplayError(RuntimeError):
    """A recomputed step's loss differs from the one recorded in the forward (non-deterministic step)."""


# ----------------------------------------------------------------------------- public API


def trajectory_matching_loss(forward: Forward, images: Tensor, labels: Tensor, start: Tensor, target: Tensor,
                             syn_lr: Union[Tensor, float], *, syn_steps: Optional[int] = None,
                             batch_syn: Optional[int] = None, batches: Optional[Sequence[Tensor]] = None,
                             augment: Optional[Augment] = None, generator: Optional[torch.Generator] = None,
                             loss_fn: Optional[LossFn] = None, drop_ratio: float = 0.0, memory: str = "constant",
                             checkpoint_every: Optional[int] = None, process_group: Optional[object] = None,
                             replay_rtol: Optional[float] = None) -> Tensor:
    """MTT / DATM / EDF's trajectory-matching loss, whose ``.backward()`` is the unrolled loop's, exactly.

    Args:
        forward: the functional student, ``forward(flat_params (P,), x (B, *image)) -> logits (B, K)``, as
            MTT's ``ReparamModule`` gives it (``lambda w, x: student_net(x, flat_param=w)``). For a plain
            ``nn.Module`` see docs/trajectory.md (``edfkern.bench.step_models.FlatStudent`` is one).
            It must be deterministic: same inputs, same logits (no dropout; BatchNorm in train mode is fine
            in one process, refused with ``process_group``).
        images: ``(N, *image)`` synthetic images, usually ``requires_grad``; ``images.grad`` is filled.
        labels: ``(N,)`` integer classes, or ``(N, K)`` float soft labels (DATM/EDF learn them; then
            ``labels.grad`` is filled when they require grad).
        start: ``(P,)`` expert parameters at epoch ``t`` (the student's ``w_0``).
        target: ``(P,)`` expert parameters at epoch ``t + M``.
        syn_lr: the student's learning rate, a 0-d (or one-element) tensor, learnable (``syn_lr.grad`` is
            filled), or a Python float.
        syn_steps: ``S``, the number of student steps; default ``len(batches)``.
        batch_syn: images per step (default all N), drawn the authors' way when ``batches`` is not given:
            a ``randperm(N)`` split into chunks of ``batch_syn``, taken from the end of the list and refilled
            when empty, drawn from ``generator`` (default: torch's CPU generator, as the released code).
        batches: an explicit list of ``S`` 1-D index tensors into ``images`` (instead of drawing).
        augment: ``augment(x) -> x``, e.g. DSA. It may draw from torch's default CPU and CUDA generators: their
            state before each step's augmentation is saved and replayed in the backward.
        generator: the ``torch.Generator`` the minibatch permutations are drawn from.
        loss_fn: ``loss_fn(logits, labels[b]) -> scalar``, a mean over the batch's rows; default
            ``F.cross_entropy`` (float labels are class probabilities, as ``nn.CrossEntropyLoss`` in DATM/EDF).
        drop_ratio: EDF's Common Pattern Dropout ratio in ``[0, 1)`` (:func:`edfkern.cpd_trajectory_loss`);
            0 is MTT's ``param_loss / param_dist``.
        memory: ``"constant"`` (reverse sweep, this op's point) or ``"unrolled"`` (the authors' graph,
            :func:`edfkern.baselines.trajectory_matching_loop`, for comparison and small cases).
        checkpoint_every: keep every ``k``-th ``w_i`` only and recompute each segment in the backward:
            about ``S/k + k`` parameter vectors instead of ``S``, for one more forward and backward per step.
        process_group: a ``torch.distributed`` group: every rank holds the same images, labels and
            parameters; each step's minibatch is split into contiguous row blocks, one per rank, and the
            step gradients and backward products are all-reduced. Every rank gets the one-process loss and
            gradients.
        replay_rtol: the backward's check that each recomputed step loss equals the forward's; default
            ``sqrt(eps)`` of the parameters' dtype, relative.

    Returns:
        The loss, a 0-d tensor (float32; float64 for float64 parameters).

    Raises:
        TrajectoryReplayError: in the backward, when a step recomputed from its saved state gives another
            loss than in the forward (dropout, an augmentation drawing from another RNG, ...).
    """
    kw = dict(syn_steps=syn_steps, batch_syn=batch_syn, batches=batches, augment=augment, generator=generator,
              loss_fn=loss_fn, drop_ratio=drop_ratio, memory=memory, checkpoint_every=checkpoint_every,
              process_group=process_group, replay_rtol=replay_rtol)
    if process_group is not None:
        # the op's header: a check failing on one rank raises on every rank, and the ranks must agree on the call
        with op_call("trajectory_matching_loss", process_group) as call:
            plan = _Plan.build(forward, images, labels, start, target, syn_lr, **kw)
            _agree(plan, images, labels, call)
            return _ConstantMemory.apply(plan, images, labels, _as_tensor(syn_lr, start))
    plan = _Plan.build(forward, images, labels, start, target, syn_lr, **kw)
    if plan.memory == "unrolled":
        return baselines.trajectory_matching_loop(
            forward, images, labels, start, target, _as_tensor(syn_lr, start), syn_steps=plan.steps,
            batch_syn=plan.batch_syn, batches=plan.given_batches, augment=augment, generator=generator,
            loss_fn=plan.loss_fn, drop_ratio=plan.drop_ratio)
    return _ConstantMemory.apply(plan, images, labels, _as_tensor(syn_lr, start))


def _as_tensor(syn_lr: Union[Tensor, float], start: Tensor) -> Tensor:
    return syn_lr if isinstance(syn_lr, Tensor) else torch.tensor(float(syn_lr), dtype=start.dtype, device=start.device)


@dataclass
class Profile:
    """Where one call's time went (seconds), for the bench's breakdown: the forward sweep, the CPD loss,
    the backward's step recomputation (forward + first backward with graph), its vector-Jacobian
    products, and the segments' recomputed forwards (``checkpoint_every``)."""

    forward: float = 0.0
    loss: float = 0.0
    replay: float = 0.0
    vjp: float = 0.0
    recompute: float = 0.0
    collectives: float = 0.0


_LAST_PROFILE = Profile()


def last_call_profile() -> Profile:
    """The :class:`Profile` of the last constant-memory call (its backward included once it has run)."""
    return _LAST_PROFILE


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """DATM's and EDF's ``SoftCrossEntropy`` (``edf_distill.py``, ``main``): the learned soft labels are
    logits, so ``sum(-log_softmax(logits) * softmax(target)) / B``. ``logits``, ``target``: ``(B, K)``.

    Pass it as ``loss_fn=`` to reproduce EDF's ``criterion``; ``F.cross_entropy`` (the default) would
    read float targets as probabilities instead.
    """
    return torch.sum(-F.log_softmax(logits, dim=1) * F.softmax(target, dim=1)) / logits.shape[0]


# ----------------------------------------------------------------------------- the plan of one call


@dataclass
class _Plan:
    """Everything one call fixes. Built (and every argument checked) before any work."""

    forward: Forward
    loss_fn: LossFn
    augment: Optional[Augment]
    start: Tensor
    target: Tensor
    steps: int
    batch_syn: int
    n: int
    given_batches: Optional[list[Tensor]]
    generator: Optional[torch.Generator]
    drop_ratio: float
    memory: str
    every: int
    group: Optional[object]
    rank: int
    world: int
    replay_rtol: float
    soft: bool
    batches: list[Tensor] = field(default_factory=list)        # filled by the forward
    rng: list[Optional[tuple]] = field(default_factory=list)   # RNG states before each augmentation
    losses: list[Tensor] = field(default_factory=list)         # each step's loss in the forward (0-d)
    k_checked: bool = False

    # ------------------------------------------------------------------ checks

    @classmethod
    def build(cls, forward, images, labels, start, target, syn_lr, *, syn_steps, batch_syn, batches, augment,
              generator, loss_fn, drop_ratio, memory, checkpoint_every, process_group, replay_rtol) -> "_Plan":
        if not callable(forward):
            raise TypeError(f"forward must be callable as forward(flat_params, x) -> logits, got "
                            f"{type(forward).__name__}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable as augment(x) -> x or None, got {type(augment).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(logits, labels) -> scalar or None, got "
                            f"{type(loss_fn).__name__}")
        C.check_float_tensor("images", images)
        if images.dim() < 1 or images.shape[0] == 0:
            raise ValueError(f"images must be (N, ...) with N >= 1, got shape {tuple(images.shape)}")
        n = images.shape[0]
        soft = _check_labels(labels, n)
        for name, v in (("start", start), ("target", target)):
            C.check_float_tensor(name, v)
            if v.dim() != 1 or v.numel() == 0:
                raise ValueError(f"{name} must be a non-empty flat parameter vector (P,), got shape {tuple(v.shape)}")
        if target.shape != start.shape:
            raise ValueError(f"target must have start's size P = {start.numel()}, got {target.numel()}")
        C.check_same_dtype(start=start, target=target)
        if isinstance(syn_lr, Tensor):
            C.check_float_tensor("syn_lr", syn_lr)
            if syn_lr.numel() != 1 or syn_lr.dim() > 1:
                raise ValueError(f"syn_lr must be a scalar (a 0-d or one-element tensor), got shape "
                                 f"{tuple(syn_lr.shape)}")
            C.check_same_device(images=images, labels=labels, start=start, target=target, syn_lr=syn_lr)
        else:
            C.check_number("syn_lr", syn_lr)
            C.check_same_device(images=images, labels=labels, start=start, target=target)
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        given = None
        if batches is not None:
            given = _check_batches(batches, n, images.device)
            steps = len(given) if syn_steps is None else C.check_int("syn_steps", syn_steps)
            if steps != len(given):
                raise ValueError(f"syn_steps = {steps} but batches holds {len(given)} index tensors; give one per step")
            bsz = max(int(b.numel()) for b in given)
            if batch_syn is not None:
                raise ValueError("give batch_syn or batches, not both (batches fixes every step's minibatch)")
        else:
            if syn_steps is None:
                raise ValueError("syn_steps is required when batches is not given")
            steps = C.check_int("syn_steps", syn_steps)
            bsz = n if batch_syn is None else C.check_int("batch_syn", batch_syn)
        drop_ratio = C.check_drop_ratio(drop_ratio)
        if checkpoint_every is not None:
            if memory != "constant":
                raise ValueError("checkpoint_every applies to memory='constant' only")
            every = C.check_int("checkpoint_every", checkpoint_every)
        else:
            every = 1
        eps = torch.finfo(start.dtype).eps
        rtol = math.sqrt(eps) if replay_rtol is None else C.check_number("replay_rtol", replay_rtol, lo=0.0)
        rank, world = 0, 1
        if process_group is not None:
            if memory != "constant":
                raise ValueError("process_group applies to memory='constant' only (the unrolled loop is one process)")
            rank, world = _comm.world(process_group)
            _refuse_train_batchnorm(forward)
        return cls(forward=forward, loss_fn=F.cross_entropy if loss_fn is None else loss_fn, augment=augment,
                   start=start, target=target, steps=steps, batch_syn=bsz, n=n, given_batches=given,
                   generator=generator, drop_ratio=drop_ratio, memory=memory, every=every, group=process_group,
                   rank=rank, world=world, replay_rtol=rtol, soft=soft)

    # ------------------------------------------------------------------ minibatches and RNG

    def draw_batches(self) -> Iterator[Tensor]:
        """Step ``i``'s indices, drawn lazily (the authors' order: the permutation, then the augmentation)."""
        chunks: list[Tensor] = []
        for i in range(self.steps):
            if self.given_batches is not None:
                yield self.given_batches[i]
                continue
            if not chunks:
                chunks = list(torch.split(torch.randperm(self.n, generator=self.generator), self.batch_syn))
            yield chunks.pop()

    def rows(self, idx: Tensor) -> slice:
        """This rank's contiguous block of a minibatch's rows (all of them in one process)."""
        b = idx.numel()
        return slice(self.rank * b // self.world, (self.rank + 1) * b // self.world)

    # ------------------------------------------------------------------ the one home of a step's loss

    def step_loss(self, w: Tensor, images: Tensor, labels: Tensor, i: int) -> Tensor:
        """Step ``i``'s loss at parameters ``w``: this rank's share ``(rows / batch) * loss_fn(...)`` of the
        minibatch loss, the augmentation replayed from its saved RNG state (drawn and saved on first use)."""
        idx = self.batches[i]
        mine = self.rows(idx)
        if self.augment is not None:
            if len(self.rng) <= i:
                self.rng.append(_rng_state(images.device))
                x = self.augment(images[idx])
            else:
                with _replayed_rng(self.rng[i], images.device):
                    x = self.augment(images[idx])
            x = x[mine]
        else:
            x = images[idx[mine]]
        if x.shape[0] == 0:  # this rank holds no row of this minibatch
            return (w * 0).sum()
        logits = self.forward(w, x)
        if not self.soft and not self.k_checked:  # once: the classes must index the logits
            self.k_checked = True
            k, top = (logits.shape[-1] if logits.dim() >= 2 else 0), int(labels.max())
            if top >= k:
                raise ValueError(f"labels must be classes in [0, K) with K = {k} (forward's logits), got label {top}")
        loss = self.loss_fn(logits, labels[idx[mine]])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        return loss.reshape(()) * (x.shape[0] / idx.numel()) if self.world > 1 else loss.reshape(())

    def checkpoints(self) -> list[int]:
        """The steps whose ``w_i`` the forward keeps."""
        return list(range(0, self.steps, self.every))


def _check_labels(labels: object, n: int) -> bool:
    """Integer ``(N,)`` classes or ``(N, K)`` float soft labels; returns whether they are soft."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, (N,) integer classes or (N, K) float soft labels, got "
                        f"{type(labels).__name__}")
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[0] != n:
            raise ValueError(f"float labels must be (N, K) soft labels with N = {n} (images' N), got shape "
                             f"{tuple(labels.shape)}")
        return True
    if labels.dtype in (torch.bool, torch.complex64, torch.complex128) or labels.is_complex():
        raise TypeError(f"labels must be integer classes or float soft labels, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"integer labels must be (N,) with N = {n} (images' N), got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    return False


def _check_batches(batches: object, n: int, device: torch.device) -> list[Tensor]:
    if isinstance(batches, Tensor) or not isinstance(batches, (list, tuple)):
        raise TypeError(f"batches must be a list of 1-D index tensors, one per step, got {type(batches).__name__}")
    if len(batches) == 0:
        raise ValueError("batches must hold at least one index tensor (one per step)")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, Tensor) or b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
            raise TypeError(f"batches[{i}] must be an integer index tensor, got "
                            f"{b.dtype if isinstance(b, Tensor) else type(b).__name__}")
        if b.dim() != 1 or b.numel() == 0:
            raise ValueError(f"batches[{i}] must be a non-empty 1-D index tensor, got shape {tuple(b.shape)}")
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"batches[{i}] indexes rows [{lo}, {hi}], outside images' [0, {n})")
        out.append(b.to(torch.int64))
    return out


def _modules_of(forward: object) -> list[nn.Module]:
    """The modules a ``forward`` callable visibly holds: itself, its bound ``self``, its attributes,
    the closure cells and defaults of a function or ``functools.partial``."""
    seen, found = set(), []

    def visit(o: object, depth: int) -> None:
        if depth > 3 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, nn.Module):
            found.append(o)
            return
        for attr in ("__self__", "func"):
            if hasattr(o, attr):
                visit(getattr(o, attr), depth + 1)
        for cell in getattr(o, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                visit(cell.cell_contents, depth + 1)
        for v in list(getattr(o, "__dict__", {}).values()) + list(getattr(o, "args", ()) or ()):
            visit(v, depth + 1)

    visit(forward, 0)
    return found


def _refuse_train_batchnorm(forward: object) -> None:
    for m in _modules_of(forward):
        for name, sub in m.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
                raise ValueError(f"process_group: the student's BatchNorm {name or type(sub).__name__!r} is in train "
                                 "mode, so its batch statistics would change when the minibatch is split over ranks; "
                                 "call .eval() on it, use instance norm (MTT's ConvNet default), or run in one process")


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def _replayed_rng(state: tuple, device: torch.device) -> Iterator[None]:
    """Run with torch's RNG as it was at ``state``, then put back the caller's stream untouched."""
    now = _rng_state(device)
    _set_rng_state(state, device)
    try:
        yield
    finally:
        _set_rng_state(now, device)


# ----------------------------------------------------------------------------- forward and reverse sweep


class _Clock:
    def __init__(self, profile: Profile, part: str) -> None:
        self.profile, self.part = profile, part

    def __enter__(self) -> None:
        import time
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        import time
        setattr(self.profile, self.part, getattr(self.profile, self.part) + time.perf_counter() - self.t0)


class _ConstantMemory(torch.autograd.Function):
    """loss = CPD(w_S) with w_S from the S-step student; backward by the reverse sweep."""

    @staticmethod
    def forward(ctx, plan: _Plan, images: Tensor, labels: Tensor, syn_lr: Tensor) -> Tensor:
        global _LAST_PROFILE
        prof = _LAST_PROFILE = Profile()
        a = syn_lr.detach().reshape(()).to(plan.start.dtype)
        x, y = images.detach(), labels.detach()
        rows = {i: r for r, i in enumerate(plan.checkpoints())}
        # the kept w_i in one preallocated (S/k, P) block: S separate P-sized tensors interleave with each
        # step's temporaries on glibc's heap and leave holes (1.6 P per step measured, against P here)
        saved = plan.start.new_empty((len(rows), plan.start.numel()))
        w = plan.start.detach().clone()
        with _Clock(prof, "forward"):
            for i, idx in enumerate(plan.draw_batches()):
                plan.batches.append(idx)
                if i in rows:
                    saved[rows[i]].copy_(w)
                loss, g = _step_grad(plan, w, x, y, i, prof)
                plan.losses.append(loss)
                w = w - a * g
        with _Clock(prof, "loss"), torch.enable_grad():
            w_s = w.requires_grad_(True)
            out = cpd_trajectory_loss(w_s, plan.target.detach(), plan.start.detach(), drop_ratio=plan.drop_ratio)
            (lam,) = torch.autograd.grad(out, w_s)
        ctx.plan, ctx.saved, ctx.rows, ctx.lam, ctx.prof = plan, saved, rows, lam, prof
        ctx.save_for_backward(images, labels, syn_lr)
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        plan = ctx.plan
        images, labels, syn_lr = ctx.saved_tensors
        need_x, need_y, need_a = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and plan.soft, ctx.needs_input_grad[3]
        prof = ctx.prof
        a = syn_lr.detach().reshape(()).to(plan.start.dtype)
        lam = ctx.lam * grad_out.to(ctx.lam.dtype)
        x, y = images.detach(), labels.detach()
        dx = torch.zeros_like(x) if need_x else None
        dy = torch.zeros_like(y) if need_y else None
        da = torch.zeros((), dtype=lam.dtype, device=lam.device)
        replayed: list[tuple[int, Tensor]] = []  # (step, recomputed loss): checked once, without a sync per step
        for seg_start in reversed(plan.checkpoints()):
            seg_end = min(seg_start + plan.every, plan.steps)
            ws = [ctx.saved[ctx.rows[seg_start]]]  # not consumed: a retained graph may run backward again
            with _Clock(prof, "recompute"):
                for i in range(seg_start, seg_end - 1):  # the segment's w_i, from its checkpoint
                    loss, g = _step_grad(plan, ws[-1], x, y, i, prof)
                    replayed.append((i, loss))
                    ws.append(ws[-1] - a * g)
            for i in range(seg_end - 1, seg_start - 1, -1):
                lam, da = _reverse_step(plan, ws.pop(), x, y, i, lam, a, da, dx, dy, need_x, need_y, prof, replayed)
        _check_replay(plan, replayed)
        if plan.world > 1:
            with _Clock(prof, "collectives"):
                _comm.all_reduce_sum_([t for t in (dx, dy) if t is not None], group=plan.group,
                                      what="trajectory_matching_loss image/label gradients")
        return (None, dx if need_x else None, dy if need_y else None,
                da.to(syn_lr.dtype).reshape(syn_lr.shape) if need_a else None)


def _step_grad(plan: _Plan, w: Tensor, x: Tensor, y: Tensor, i: int, prof: Profile) -> tuple[Tensor, Tensor]:
    """Step ``i``'s loss (all ranks' sum, 0-d, no host sync) and its gradient ``g_i`` at ``w``, no graph kept."""
    with torch.enable_grad():
        wl = w.detach().requires_grad_(True)
        loss = plan.step_loss(wl, x, y, i)
        (g,) = torch.autograd.grad(loss, wl, allow_unused=True)
    g = torch.zeros_like(w) if g is None else g
    if plan.world > 1:
        buf = torch.cat([g.reshape(-1), loss.detach().reshape(1).to(g.dtype)])
        with _Clock(prof, "collectives"):
            _comm.all_reduce_sum_([buf], group=plan.group, what=f"trajectory_matching_loss step {i} gradient")
        return buf[-1].clone(), buf[:-1]  # a copy: a view would keep the (P + 1) buffer of every step
    return loss.detach(), g


def _reverse_step(plan: _Plan, w: Tensor, x: Tensor, y: Tensor, i: int, lam: Tensor, a: Tensor, da: Tensor,
                  dx: Optional[Tensor], dy: Optional[Tensor], need_x: bool, need_y: bool,
                  prof: Profile, replayed: list[tuple[int, Tensor]]) -> tuple[Tensor, Tensor]:
    """One step of the adjoint sweep: ``lam = dL/dw_{i+1}`` in, ``dL/dw_i`` out; adds step ``i``'s terms to
    ``dx``, ``dy`` and returns ``da``. The product is taken with ``-a lam``, the cotangent that
    ``w_{i+1} = w_i - a g_i`` sends to ``g_i``, so ``H_i``, ``J_X`` and ``J_Y`` terms come out scaled."""
    with torch.enable_grad():
        with _Clock(prof, "replay"):
            wl = w.detach().requires_grad_(True)
            xl = x.detach().requires_grad_(True) if need_x else x
            yl = y.detach().requires_grad_(True) if need_y else y
            loss = plan.step_loss(wl, xl, yl, i)
            (g,) = torch.autograd.grad(loss, wl, create_graph=True, allow_unused=True)
        hl = jx = jy = None
        if g is not None and g.requires_grad:  # else the loss is at most linear in w: no second-order terms
            with _Clock(prof, "vjp"):
                inputs = [wl] + ([xl] if need_x else []) + ([yl] if need_y else [])
                outs = torch.autograd.grad(g, inputs, grad_outputs=-a * lam, allow_unused=True)
            hl, jx, jy = outs[0], (outs[1] if need_x else None), (outs[-1] if need_y else None)
    g = torch.zeros_like(w) if g is None else g.detach()
    hl = torch.zeros_like(w) if hl is None else hl
    if plan.world > 1:
        buf = torch.cat([g.reshape(-1), hl.reshape(-1), loss.detach().reshape(1).to(g.dtype)])
        with _Clock(prof, "collectives"):
            _comm.all_reduce_sum_([buf], group=plan.group, what=f"trajectory_matching_loss step {i} backward")
        p = w.numel()
        g, hl, value = buf[:p], buf[p:2 * p], buf[-1].clone()
    else:
        value = loss.detach()
    replayed.append((i, value))
    if jx is not None:
        dx.add_(jx)
    if jy is not None:
        dy.add_(jy)
    return lam + hl, da - torch.dot(g, lam)


def _check_replay(plan: _Plan, replayed: list[tuple[int, Tensor]]) -> None:
    """Every recomputed step must give the forward's loss (NaN where it was NaN); otherwise the gradient
    would be wrong. One comparison of all steps (one host sync), before any gradient is returned; the
    error names the first step the backward met."""
    if not replayed:
        return
    got = torch.stack([v.to(plan.losses[i].dtype) for i, v in replayed])
    ref = torch.stack([plan.losses[i] for i, _ in replayed])
    ok = (got == ref) | ((got - ref).abs() <= plan.replay_rtol * ref.abs().clamp_min(1e-30)) | (got.isnan() & ref.isnan())
    if bool(ok.all()):
        return
    j = int((~ok).nonzero()[0])
    i, value, r = replayed[j][0], float(got[j]), float(ref[j])
    raise TrajectoryReplayError(
        f"trajectory_matching_loss: step {i} recomputed in the backward gives loss {value!r}, but the forward "
        f"gave {r!r} (relative difference {abs(value - r) / max(abs(r), 1e-30):.3g} > replay_rtol "
        f"{plan.replay_rtol:.3g}). The step is not deterministic: dropout or another random layer in the student, "
        "an augmentation drawing from an RNG other than torch's default generators (numpy, random, an explicit "
        "torch.Generator), or a forward with side effects. Make it deterministic, or use memory='unrolled'")


# ----------------------------------------------------------------------------- process groups


def _fingerprint(*parts: object) -> int:
    """A 62-bit hash of tensors' bytes and other values, for the ranks' agreement check."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, Tensor):
            h.update(str((p.dtype, tuple(p.shape))).encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if p.numel() else b"")
        else:
            h.update(repr(p).encode())
    return int.from_bytes(h.digest(), "little") >> 2


def _agree(plan: _Plan, images: Tensor, labels: Tensor, call) -> None:
    """With a process group: every rank must make the same call (shapes, scalars, batches, RNG state),
    or every rank raises the same ``ValueError`` before any step runs. The words travel in the op's
    header (:class:`edfkern.distributed._agree.op_call`)."""
    draws = plan.given_batches is None
    names = ["call (shapes, scalars, batches)", "torch RNG state / generator"]
    mine = [
        _fingerprint("trajectory_matching_loss", tuple(images.shape), images.dtype, tuple(labels.shape), labels.dtype,
                     plan.start.numel(), plan.start.dtype, plan.steps, plan.batch_syn, plan.drop_ratio, plan.every,
                     plan.augment is not None, *(plan.given_batches or [])),
        _fingerprint(*(_rng_state(images.device) if (draws and plan.generator is None) or plan.augment is not None
                       else ()), plan.generator.get_state() if draws and plan.generator is not None else 0),
    ]
    table = call.exchange(mine)
    for j, name in enumerate(names):
        col = [row[j] for row in table]
        if len(set(col)) > 1:
            differ = [r for r, v in enumerate(col) if v != col[0]]
            raise ValueError(f"trajectory_matching_loss with process_group: ranks {differ} differ from rank 0 in their "
                             f"{name}; every rank must pass the same images, labels, parameters, scalars and batches, "
                             "and seed torch's RNG (and generator) identically, so that every rank draws the same "
                             "minibatches and augmentations")
