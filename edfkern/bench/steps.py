"""The whole distillation iterations ``python -m edfkern.bench --step dm-iid|mtt-edf`` profiles, loops vs edfkern.

The per-op tables of ``python -m edfkern.bench`` say how much faster each op is. This mode answers
the user's question one level up: how much faster, and how much leaner, is a *whole* distillation
iteration at large IPC, and which share of it can edfkern speed up at all?

Each step is written in two (MTT: three) versions, with the same data, the same network and the same
random numbers:

``loop``
    the authors' structure, built from :mod:`edfkern.baselines`: per-class forward passes and
    losses, the per-class / per-sample loss loops, the full-sort CPD block, the per-image mask loop
    with ``grad *= mask`` and ``torch.optim.SGD``, torchcam-style Grad-CAM class by class;
``edfkern``
    the drop-in version (INTEGRATION.md): one batched forward, the public edfkern losses,
    ``edfkern.cpd_trajectory_loss``, :class:`edfkern.optim.DAESGD` and :class:`edfkern.cam.CAMExtractor`.
``constant`` (``mtt-edf`` only)
    ``edfkern`` with the unrolled student replaced by :func:`edfkern.trajectory_matching_loss` on the
    same minibatches (forward sweep without graphs, then the reverse sweep: constant activation memory);
    its parts come from :func:`edfkern.trajectory.last_call_profile`.

Steps (cifar10 shapes of docs/benchmarks.md: K = 10 classes, 3x32x32 images)

``dm-iid``
    DM + IID. A ConvNet (width 128, depth 3, instance norm) freshly initialised every iteration
    and not trained (DM); the fresh net is drawn outside the timed parts. The real batch
    (256 per class) is embedded class by class without a graph in both versions. Loss on the
    synthetic embeddings: DM mean matching on the flat embedding (weight 1) + CC on the flat
    embedding + CM on the last block's local features 128 x (4x4) (weights as in
    ``python/demo_dm_iid.py``: CC 0.001, CM 0.01), backward to the images, SGD (momentum 0.5).
``mtt-edf``
    MTT + EDF. A student ConvNet (width 128, depth 3: P = 320,010, the config's CPD P) unrolled
    over ``syn_steps`` SGD steps from the expert's start parameters (functional parameters,
    ``create_graph=True``, ``batch_syn`` synthetic images per step, a learnable lr), CPD against
    the expert's target parameters, backward to the images and the lr, DAE + the image step, and
    a Smooth Grad-CAM++ refresh every ``interval`` iterations, amortised: the refresh is timed
    once (in the first, memory-measured iteration) and ``refresh / interval`` is added to the
    time per iteration. The CAM network stands in for EDF's separately trained one (EDF: ImageNet
    ResNet-18 at ``layer4``): a ConvNet of width ``--cam-width`` (default 32, so a refresh at
    IPC 1000 fits a CPU run), maps at its last block (4x4).

Sweep axis: ``--sweep ipc=...`` (images per class), or ``--sweep syn_steps=...`` at ``--ipc`` (MTT only).

Memory: every (step, version, point) runs in a fresh child process (:func:`edfkern.bench.memory.run_isolated`):
a tiny warm-up iteration, then one iteration (with the CAM refresh for MTT) under
:func:`edfkern.bench.memory.measure_call` (``VmHWM`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
Time: one more fresh child per point steps every version in lockstep (as the demos do, so a load change
on a shared machine hits both alike): one untimed full-size iteration each, then ``--repeat`` timed
rounds; the median is reported. MTT's refresh time is the one timed in each version's memory child.
Before a child starts, its peak is estimated from the shapes (the activations autograd keeps, see
:func:`estimate_peak_bytes`) and the point is skipped, with the reason on one line, when the estimate
passes ``--budget-mb`` or the machine's available memory (or its estimated time passes ``--timeout``);
a watchdog kills any child whose resident set passes the limit, and ``--timeout`` bounds each child.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import edfkern
from edfkern import baselines
from edfkern.cam import CAMExtractor
from edfkern.optim import DAESGD
from edfkern.trajectory import last_call_profile

from . import memory
from .configs import CONFIGS
from .report import Panel, Series, fmt_bytes, fmt_time
from .step_models import FlatStudent, conv_costs, flat_params, seeded_convnet

__all__ = ["STEPS", "VERSIONS", "STEP_VERSIONS", "SWEEP_KEYS", "StepParams", "DMIIDStep", "MTTEDFStep", "make_step",
           "estimate_peak_bytes", "estimate_seconds", "input_bytes", "run_step_task", "Point", "sweep_points",
           "describe", "summarise", "largest_fit", "table", "panels"]

STEPS = ("dm-iid", "mtt-edf")
VERSIONS = ("loop", "edfkern", "constant")
#: the versions each step has (``constant``: MTT's student by :func:`edfkern.trajectory_matching_loss`)
STEP_VERSIONS = {"dm-iid": ("loop", "edfkern"), "mtt-edf": ("loop", "edfkern", "constant")}
#: the axes of ``--sweep``: images per class, or (MTT) the unrolled student's steps at a fixed ``--ipc``
SWEEP_KEYS = ("ipc", "syn_steps")
AXIS_LABEL = {"ipc": "IPC", "syn_steps": "syn_steps"}
DEFAULT_SWEEP = (10, 50, 100)
CATEGORIES = ("network", "CAM", "losses", "update")
MB = 2 ** 20
_CIFAR10 = CONFIGS["cifar10-ipc1000"]


@dataclass(frozen=True)
class StepParams:
    """The shapes and hyper-parameters of one step (defaults: the cifar10 config's, and the demos' values)."""

    # images: the config's classes and image size; the ConvNet's width and depth
    K: int = _CIFAR10.K
    channels: int = _CIFAR10.image[0]
    size: int = _CIFAR10.image[1]
    width: int = 128
    depth: int = 3
    # DM + IID: real images per class, the CC and CM weights, the image lr; the edfkern version embeds the
    # synthetic set in one batched forward (INTEGRATION.md, "IID on DM") unless dm_batched_forward is off
    real_per_class: int = _CIFAR10.real_per_class
    w_cc: float = 0.001
    w_cm: float = 0.01
    lr_img_dm: float = 1.0
    dm_batched_forward: bool = True
    # MTT: the student's unrolled steps, CPD's drop ratio, synthetic images per step, EDF's CAM refresh
    # interval, the image lr, the student's initial (learnable) lr and that lr's own lr
    syn_steps: int = 10
    drop_ratio: float = _CIFAR10.drop_ratio
    batch_syn: int = 10
    interval: int = 50
    lr_img_mtt: float = 1000.0
    lr_teacher: float = 0.01
    lr_lr: float = 1e-5
    # EDF: DAE's beta and threshold; the CAM ConvNet's width, Smooth Grad-CAM++'s samples and noise std,
    # CAMExtractor's batch_size
    beta: float = _CIFAR10.beta
    threshold: Optional[float] = None
    cam_width: int = 32
    cam_samples: int = _CIFAR10.cam_samples
    cam_std: float = 0.3
    cam_batch: int = 1024

    def net_kw(self, width: Optional[int] = None) -> dict:
        return dict(channels=self.channels, num_classes=self.K, width=width or self.width, depth=self.depth,
                    size=self.size)


# ----------------------------------------------------------------------------- timing of parts


class Parts:
    """Wall time per named part of an iteration (synchronising the device at each boundary)."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to part ``name`` (for parts timed inside an op, e.g. its own profile)."""
        self.s[name] = self.s.get(name, 0.0) + seconds


def _randn(shape, g: torch.Generator, dtype: torch.dtype, device: str) -> Tensor:
    """float32 draws (so a float64 run sees exactly the float32 run's values), cast to ``dtype``."""
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- DM + IID


class DMIIDStep:
    """One DM + IID iteration; ``version`` is ``"loop"`` (edfkern.baselines) or ``"edfkern"``."""

    #: part -> category (what the table groups by)
    PARTS = {"net forward (real)": "network", "net forward (syn)": "network", "losses fwd+bwd": "losses",
             "net backward": "network", "update": "update"}

    def __init__(self, version: str, ipc: int, p: StepParams, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        self.version, self.ipc, self.p, self.device, self.dtype, self.seed = version, ipc, p, device, dtype, seed
        g = torch.Generator().manual_seed(seed)
        n_img = (p.channels, p.size, p.size)
        self.image_syn = _randn((p.K * ipc,) + n_img, g, dtype, device).requires_grad_(True)
        self.real = _randn((p.K * p.real_per_class,) + n_img, g, dtype, device)  # class-contiguous
        self.opt = torch.optim.SGD([self.image_syn], lr=p.lr_img_dm, momentum=0.5)  # DM's image optimizer
        self.net = None
        self.loss = float("nan")

    def prepare(self, it: int) -> None:
        """Untimed: DM's fresh random ConvNet for iteration ``it`` (the same in both versions)."""
        self.net = seeded_convnet(1_000_003 * self.seed + it, dtype=self.dtype, device=self.device,
                                  **self.p.net_kw())
        for w in self.net.parameters():
            w.requires_grad_(False)

    def refresh(self, parts: Parts) -> None:
        """DM has no CAM."""

    def iteration(self, parts: Parts) -> None:
        p, K, ipc, feats = self.p, self.p.K, self.ipc, self.net.features
        R = p.real_per_class
        loop = self.version == "loop"
        ops = baselines if loop else edfkern
        with parts("net forward (real)"), torch.no_grad():  # identical in both versions: class by class
            loc_real = torch.cat([feats(self.real[c * R:(c + 1) * R]) for c in range(K)]).flatten(2)
        with parts("net forward (syn)"):
            if loop or not p.dm_batched_forward:  # the authors' per-class loop
                loc_syn = torch.cat([feats(self.image_syn[c * ipc:(c + 1) * ipc]) for c in range(K)])
            else:
                loc_syn = feats(self.image_syn)
        with parts("losses fwd+bwd"):
            f = loc_syn.detach().flatten(2).requires_grad_(True)  # (N, C, L): IID's local features
            loss = (ops.mean_matching_loss(f.flatten(1), loc_real.flatten(1), syn_groups=K, real_groups=K)
                    + ops.class_centralization_loss(f.flatten(1), groups=K, weight=p.w_cc)
                    + ops.covariance_matching_loss(f, loc_real, syn_groups=K, real_groups=K, weight=p.w_cm))
            loss.backward()
        with parts("net backward"):
            self.opt.zero_grad(set_to_none=True)
            loc_syn.backward(f.grad.view_as(loc_syn))
        with parts("update"):
            self.opt.step()
        self.loss = float(loss.detach())


# ----------------------------------------------------------------------------- MTT + EDF


class MTTEDFStep:
    """One MTT + EDF iteration (and the CAM refresh EDF runs every ``interval`` iterations)."""

    PARTS = {"CAM refresh": "CAM", "student unroll (net fwd+bwd)": "network", "CPD loss fwd+bwd": "losses",
             "unroll backward (net)": "network", "DAE + update": "update",
             # constant: the reverse sweep of edfkern.trajectory_matching_loss (edfkern.trajectory.last_call_profile)
             "reverse sweep: step replay (net fwd+bwd, graph)": "network",
             "reverse sweep: vjp (net double backward)": "network", "reverse sweep: rest": "network"}
    def __init__(self, version: str, ipc: int, p: StepParams, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, given_noise: bool = False) -> None:
        """``given_noise``: draw the CAM noise up front in float32 and hand it to both CAM paths (so a
        float64 run sees the float32 run's draws: the tests' oracle); else each path draws from the
        generator (CAMExtractor's convention; no ``(S, N, C, H, W)`` tensor is held)."""
        self.version, self.ipc, self.p, self.device, self.dtype, self.seed = version, ipc, p, device, dtype, seed
        self.given_noise = given_noise
        g = torch.Generator().manual_seed(seed)
        K, N = p.K, p.K * ipc
        self.image_syn = _randn((N, p.channels, p.size, p.size), g, dtype, device).requires_grad_(True)
        self.label_syn = torch.arange(K, device=device).repeat_interleave(ipc)
        net = seeded_convnet(seed + 1, dtype=dtype, device=device, **p.net_kw())
        self.student = FlatStudent(net)
        self.start = flat_params(net)  # the expert at epoch t ...
        self.target = self.start + 0.01 * _randn(self.start.shape, g, dtype, device)  # ... and at t + M
        self.syn_lr = torch.tensor(p.lr_teacher, dtype=dtype, device=device, requires_grad=True)
        if version == "loop":
            self.opt_img = torch.optim.SGD([self.image_syn], lr=p.lr_img_mtt, momentum=0.5)
        else:
            self.opt_img = DAESGD([self.image_syn], lr=p.lr_img_mtt, momentum=0.5, beta=p.beta,
                                                threshold=p.threshold)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=p.lr_lr, momentum=0.5)
        self.cam_net = seeded_convnet(seed + 2, dtype=dtype, device=device, **p.net_kw(p.cam_width)).eval()
        self.cam_layer = f"features.{p.depth - 1}"
        self.g_order = torch.Generator().manual_seed(seed + 3)
        self.g_cam = torch.Generator(device=device if not given_noise else "cpu").manual_seed(seed + 4)
        self.cams: Optional[Tensor] = None
        self.order: list[Tensor] = []
        self.loss = float("nan")

    def prepare(self, it: int) -> None:
        """Untimed: the minibatches of the unrolled student for this iteration."""
        N, B = self.image_syn.shape[0], min(self.p.batch_syn, self.image_syn.shape[0])
        self.order = [torch.randperm(N, generator=self.g_order)[:B].to(self.device) for _ in range(self.p.syn_steps)]

    def refresh(self, parts: Parts) -> None:
        """EDF's CAM refresh (every ``interval`` iterations)."""
        p = self.p
        noise = None
        if self.given_noise:
            noise = _randn((p.cam_samples,) + tuple(self.image_syn.shape), self.g_cam, self.dtype, self.device)
        with parts("CAM refresh"):
            if self.version == "loop":
                self.cams = baselines.cams_per_class(self.cam_net, self.cam_net.get_submodule(self.cam_layer),
                                                     self.image_syn.detach(), self.ipc, num_samples=p.cam_samples,
                                                     std=p.cam_std, generator=self.g_cam, noise=noise)
            else:
                with CAMExtractor(self.cam_net, self.cam_layer, num_samples=p.cam_samples, std=p.cam_std,
                                  batch_size=p.cam_batch) as ext:
                    self.cams = ext(self.image_syn, self.label_syn, generator=self.g_cam, noise=noise)
                self.opt_img.set_cam(self.image_syn, self.cams)

    def use_cams(self, cams: Tensor) -> None:
        """Take given ``(N, h, w)`` maps instead of refreshing (the lockstep timing run shares one refresh)."""
        self.cams = cams.detach().clone()
        if self.version != "loop":
            self.opt_img.set_cam(self.image_syn, self.cams)

    def iteration(self, parts: Parts) -> None:
        p, image_syn = self.p, self.image_syn
        loop = self.version == "loop"
        if self.version == "constant":
            loss = self._constant_memory_loss(parts)
        else:
            loss = self._unrolled_loss(parts)
        with parts("DAE + update"):
            if loop:
                image_syn.grad *= baselines.create_soft_mask(self.cams, tuple(image_syn.shape[-2:]), p.beta,
                                                             p.threshold)
            self.opt_img.step()
            self.opt_lr.step()
        self.loss = float(loss.detach())

    def _unrolled_loss(self, parts: Parts) -> Tensor:
        """The authors' student (``create_graph=True`` at every step), CPD, backward: fills the grads."""
        p, image_syn, label_syn = self.p, self.image_syn, self.label_syn
        loop = self.version == "loop"
        with parts("student unroll (net fwd+bwd)"):
            w = self.start.clone().requires_grad_(True)
            for idx in self.order:
                ce = F.cross_entropy(self.student(w, image_syn[idx]), label_syn[idx])
                (gw,) = torch.autograd.grad(ce, w, create_graph=True)
                w = w - self.syn_lr * gw
        with parts("CPD loss fwd+bwd"):
            leaf = w.detach().requires_grad_(True)
            cpd = baselines.cpd_trajectory_loss if loop else edfkern.cpd_trajectory_loss
            loss = cpd(leaf, self.target, self.start, drop_ratio=p.drop_ratio)
            loss.backward()
        with parts("unroll backward (net)"):
            self.opt_img.zero_grad(set_to_none=True)
            self.opt_lr.zero_grad(set_to_none=True)
            w.backward(leaf.grad)
            del w
        return loss

    def _constant_memory_loss(self, parts: Parts) -> Tensor:
        """:func:`edfkern.trajectory_matching_loss` on the same batches: forward sweep + CPD, then the reverse
        sweep; its own profile splits the two calls into the table's parts."""
        p = self.p
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        t = Parts(self.device)
        with t("forward"):
            loss = edfkern.trajectory_matching_loss(self.student, self.image_syn, self.label_syn, self.start,
                                                    self.target, self.syn_lr, batches=self.order,
                                                    drop_ratio=p.drop_ratio)
        with t("backward"):
            loss.backward()
        prof = last_call_profile()
        parts.add("student unroll (net fwd+bwd)", t.s["forward"] - prof.loss)
        parts.add("CPD loss fwd+bwd", prof.loss)
        parts.add("reverse sweep: step replay (net fwd+bwd, graph)", prof.replay + prof.recompute)
        parts.add("reverse sweep: vjp (net double backward)", prof.vjp)
        parts.add("reverse sweep: rest", max(0.0, t.s["backward"] - prof.replay - prof.recompute - prof.vjp))
        return loss


_STEP_CLASSES = {"dm-iid": DMIIDStep, "mtt-edf": MTTEDFStep}


def make_step(step: str, version: str, ipc: int, p: StepParams, **kw):
    """The step object for ``step`` in ``version`` at ``ipc`` images per class."""
    if step not in _STEP_CLASSES:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if version not in STEP_VERSIONS[step]:
        raise ValueError(f"version must be one of {STEP_VERSIONS[step]} for step {step!r}, got {version!r}")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be an int >= 1, got {ipc!r}")
    return _STEP_CLASSES[step](version, ipc, p, **kw)


# ----------------------------------------------------------------------------- estimates from the shapes


def input_bytes(step: str, ipc: int, p: StepParams) -> int:
    """What the step holds before any work: synthetic images (value, grad, momentum buffer) plus the
    real batch (DM) or the expert's start and target parameters (MTT), in float32."""
    img = p.channels * p.size * p.size * 4
    syn = 3 * p.K * ipc * img
    if step == "dm-iid":
        return syn + p.K * p.real_per_class * img
    return syn + 2 * conv_costs(**p.net_kw()).params * 4


def estimate_peak_bytes(step: str, version: str, ipc: int, p: StepParams) -> int:
    """Peak above the process before the step existed, from the shapes (float32).

    DM: the inputs, the activations autograd keeps for the N synthetic images (saved floats per image
    of :func:`~edfkern.bench.step_models.conv_costs`), the backward's transient gradient (the largest
    activation per image), and the real batch's per-class forward (two of the largest activation per
    real image of one class). (Checked against measured peaks: within +10% / +40% on CPU at IPC 10-50.) MTT: the inputs, the unrolled student's graph (about
    three forward's worth of saved activations per image and step: forward, its backward, both kept
    by ``create_graph``, plus two parameter vectors per step, ``w_{i+1}`` and ``g_i``), the CAM refresh
    (loop: one class's forward + backward; edfkern: ``cam_batch`` rows forward), and the loop's
    full-resolution ``(N, 1, H, W)`` upsampled map and mask. ``constant``
    (:func:`edfkern.trajectory_matching_loss`): ``syn_steps`` parameter vectors, one step's
    double-backward graph, and six more parameter vectors (adjoint, gradients, CPD's buffers).
    """
    N, f = p.K * ipc, 4
    base = input_bytes(step, ipc, p)
    c = conv_costs(**p.net_kw())
    if step == "dm-iid":
        syn = N * (c.saved_floats + c.peak_layer_floats) * f
        real = p.real_per_class * 2 * c.peak_layer_floats * f
        return base + syn + real
    B = min(p.batch_syn, N)
    step_graph = B * 3 * c.saved_floats * f  # one step's forward + backward, kept by create_graph
    transient = B * 2 * c.peak_layer_floats * f
    if version == "constant":
        student = p.syn_steps * c.params * f + step_graph + transient + 6 * c.params * f
    else:
        student = p.syn_steps * (step_graph + 2 * c.params * f) + transient
    cc = conv_costs(**p.net_kw(p.cam_width))
    if version == "loop":
        cam = ipc * (cc.saved_floats + 3 * cc.peak_layer_floats) * f + N * p.channels * p.size * p.size * f
        mask = 2 * N * p.size * p.size * f
    else:
        cam = min(p.cam_batch, p.cam_samples * N) * 3 * cc.peak_layer_floats * f \
            + N * p.channels * p.size * p.size * f
        mask = 0
    return base + max(student, cam) + mask


def iteration_flops(step: str, version: str, ipc: int, p: StepParams) -> tuple[float, float]:
    """(FLOPs of one iteration, FLOPs of one CAM refresh), convolutions only (the rest is small)."""
    N = p.K * ipc
    F_ = conv_costs(**p.net_kw()).fwd_flops
    if step == "dm-iid":
        return p.K * p.real_per_class * F_ + 3 * N * F_, 0.0
    B = min(p.batch_syn, N)
    Fc = conv_costs(**p.net_kw(p.cam_width)).fwd_flops
    cam = N * (1 + 3 * p.cam_samples) * Fc if version == "loop" else N * (1 + p.cam_samples) * Fc
    # unrolled: forward, backward with graph, double backward = 9 forwards per image and step; constant adds
    # the forward sweep's forward + backward (3)
    return p.syn_steps * B * (12 if version == "constant" else 9) * F_, cam


def estimate_seconds(step: str, version: str, ipc: int, p: StepParams, iterations: int, refreshes: int,
                     flops_per_s: float) -> float:
    """Seconds for ``iterations`` iterations and ``refreshes`` CAM refreshes of one version at ``flops_per_s``."""
    it, cam = iteration_flops(step, version, ipc, p)
    return (iterations * it + refreshes * cam) / max(flops_per_s, 1.0)


# ----------------------------------------------------------------------------- the child


def _warm_up(step: str, version: str, p: StepParams, device: str, seed: int) -> None:
    """One iteration at IPC 1 with a tiny real batch and student: loads kernels, starts thread pools."""
    tiny = make_step(step, version, 1, replace(p, real_per_class=2, batch_syn=2, syn_steps=1), device=device,
                     seed=seed + 99)
    tiny.prepare(0)
    tiny.refresh(Parts(device))
    tiny.iteration(Parts(device))


def _memory_task(task: dict) -> dict[str, Any]:
    device, p, seed = task["device"], StepParams(**task["params"]), task.get("seed", 0)
    _warm_up(task["step"], task["version"], p, device, seed)
    memory.trim_heap()
    before = memory.usage_before(device)
    s = make_step(task["step"], task["version"], task["ipc"], p, device=device, seed=seed)
    first = Parts(device)

    def first_iteration():
        s.prepare(0)
        s.refresh(first)
        s.iteration(first)

    mem, _ = memory.measure_call(first_iteration, lambda out: 0, device=device, before_inputs=before)
    return dict(memory=mem.as_dict(), peak_bytes=mem.footprint, refresh_s=first.s.get("CAM refresh"))


def _timing_task(task: dict) -> dict[str, Any]:
    device, p, seed, versions = task["device"], StepParams(**task["params"]), task.get("seed", 0), task["versions"]
    for v in versions:
        _warm_up(task["step"], v, p, device, seed)
    steps = {v: make_step(task["step"], v, task["ipc"], p, device=device, seed=seed) for v in versions}
    if task["step"] == "mtt-edf":  # one refresh (untimed here), its maps handed to every version
        ref = steps.get("edfkern", steps[versions[0]])
        ref.refresh(Parts(device))
        for s in steps.values():
            if s is not ref:
                s.use_cams(ref.cams)
    for v in versions:  # a full-size iteration each, untimed (first touch of the activations' pages)
        steps[v].prepare(0)
        steps[v].iteration(Parts(device))
    out = {v: dict(iteration_s=[], parts=[]) for v in versions}
    for r in range(task["repeat"]):
        for v in (versions if r % 2 == 0 else versions[::-1]):  # alternate who goes first
            s = steps[v]
            s.prepare(r + 1)
            pt = Parts(device)
            pt.sync()
            t0 = time.perf_counter()
            s.iteration(pt)
            pt.sync()
            out[v]["iteration_s"].append(time.perf_counter() - t0)
            out[v]["parts"].append(pt.s)
    for v in versions:
        parts = out[v].pop("parts")
        out[v]["parts_s"] = {k: statistics.median(d.get(k, 0.0) for d in parts) for k in parts[0]}
        out[v]["loss"] = steps[v].loss
    return out


def run_step_task(task: dict) -> dict[str, Any]:
    """One child's work (a fresh process; plain dicts in and out), by ``task["mode"]``:

    ``memory``
        one version: a warm-up iteration at IPC 1, then the full-size step's first iteration (with
        the CAM refresh for MTT, timed: the refresh time of the report) under
        :func:`edfkern.bench.memory.measure_call`. Returns ``memory``, ``peak_bytes``, ``refresh_s``.
    ``time``
        every version of ``task["versions"]`` in one process, stepped in lockstep (as the demos do), so
        a load change on a shared machine hits both alike: warm-ups, one untimed full-size iteration
        each, then ``repeat`` timed rounds. MTT's CAMs come from one untimed refresh shared by all
        versions. Returns ``{version: {iteration_s, parts_s, loss}}``.
    """
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    if task["mode"] == "memory":
        return _memory_task(task)
    if task["mode"] == "time":
        return _timing_task(task)
    raise ValueError(f"task mode must be 'memory' or 'time', got {task['mode']!r}")


# ----------------------------------------------------------------------------- the sweep's points


@dataclass(frozen=True)
class Point:
    """One point of the sweep: its value on the axis, the IPC and the step's parameters there."""

    x: int
    ipc: int
    params: StepParams


def sweep_points(axis: str, values: list[int], p: StepParams, ipc: int) -> list[Point]:
    """The points of ``--sweep axis=values``: IPC values, or ``syn_steps`` values at ``ipc``."""
    if axis == "ipc":
        return [Point(v, v, p) for v in values]
    return [Point(v, ipc, replace(p, syn_steps=v)) for v in values]


# ----------------------------------------------------------------------------- results, table and plot


def describe(step: str, p: StepParams) -> str:
    """One line with the shapes and hyper-parameters the step runs at."""
    net = f"ConvNet width {p.width} depth {p.depth} ({conv_costs(**p.net_kw()).params:,} params)"
    head = f"K={p.K}, {p.channels}x{p.size}x{p.size} images, {net}"
    h = p.size // 2 ** p.depth
    if step == "dm-iid":
        fwd = "one batched forward" if p.dm_batched_forward else "a per-class forward, as the loop"
        return (f"{head}, fresh random net per iteration (drawn outside the timed parts); edfkern version: {fwd}; "
                f"real batch "
                f"{p.real_per_class}/class; loss = DM (weight 1) + CC on the flat embedding (weight {p.w_cc:g}) + "
                f"CM on the last block's local features {p.width}x({h}x{h}) (weight {p.w_cm:g}); SGD lr {p.lr_img_dm:g} "
                f"momentum 0.5")
    return (f"{head}; syn_steps {p.syn_steps}, batch_syn {p.batch_syn}, CAM refresh every interval={p.interval} "
            f"iterations (timed once per version, in its memory run; refresh/interval added to each "
            f"iteration), Smooth Grad-CAM++ {p.cam_samples} samples std {p.cam_std:g} on a ConvNet of width {p.cam_width} (CAMExtractor "
            f"batch_size {p.cam_batch}); CPD drop {p.drop_ratio:g}, DAE beta {p.beta:g}, lr_img {p.lr_img_mtt:g}, "
            f"lr_lr {p.lr_lr:g}. These are the demo's values (python/demo_mtt_edf.py: syn_steps 10, interval 50) "
            f"with a fixed minibatch batch_syn, so the student's cost does not grow with IPC; the repository "
            f"does not state EDF's own CIFAR-10 values")


def summarise(r: dict, p: StepParams) -> None:
    """Add the per-iteration time (median + refresh/interval), per-category shares to an ok result."""
    it = statistics.median(r["iteration_s"])
    refresh = r.get("refresh_s") or 0.0
    amort = refresh / p.interval if r["step"] == "mtt-edf" else 0.0
    total = it + amort
    r["time_s"] = total
    r["iteration_median_s"] = it
    r["refresh_per_iteration_s"] = amort
    parts = dict(r["parts_s"])
    if r["step"] == "mtt-edf":
        parts["CAM refresh"] = amort
    known = _STEP_CLASSES[r["step"]].PARTS
    cats = {c: 0.0 for c in CATEGORIES}
    for name, sec in parts.items():
        cats[known.get(name, "update")] += sec
    s = sum(parts.values()) or 1.0
    r["share"] = {c: cats[c] / s for c in CATEGORIES}
    r["parts_per_iteration_s"] = parts


def largest_fit(rows: list[dict], budget: float, axis: str = "ipc") -> tuple[Optional[int], str]:
    """The largest point on ``axis`` (a key of the rows: ``ipc`` or ``syn_steps``) within ``budget`` bytes: a
    measured point, or a linear extrapolation (said so)."""
    lab = AXIS_LABEL.get(axis, axis)
    ok = sorted((r[axis], r["peak_bytes"]) for r in rows if r.get("peak_bytes") is not None)
    if not ok:
        return None, "no measured point"
    fits = [i for i, b in ok if b <= budget]
    if not fits:
        return None, f"even {lab} {ok[0][0]} needs {fmt_bytes(ok[0][1])}"
    best = max(fits)
    if len(ok) >= 2:
        (i0, b0), (i1, b1) = ok[-2], ok[-1]
        slope = (b1 - b0) / max(i1 - i0, 1)
        if slope > 0:
            x = int(i1 + (budget - b1) / slope)
            if x > ok[-1][0]:
                return best, (f"measured up to {lab} {best}; extrapolated (linear from {lab} {i0} and {i1}, "
                              f"{slope / MB:.1f} MB per {lab}): about {lab} {x}")
            if x > best:  # between a fitting and a failing measured point
                return best, f"measured: {lab} {best}; interpolated: about {lab} {x}"
    return best, f"measured: {lab} {best}"


def table(step: str, results: list[dict], budget: float, versions: list[str], axis: str = "ipc"
          ) -> tuple[str, list[str], list[list[str]], list[str], list[str]]:
    """(title, columns, rows, caption, notes) of the step's table (printed by :func:`edfkern.bench.report.print_table`);
    the notes are the budget lines, the constant version's breakdown and every skip or error."""
    lab = AXIS_LABEL[axis]
    cols = [lab, "version", "time / iter", "peak memory", "est. peak", *CATEGORIES, "speedup", "memory ratio"]
    rows = []
    by = {(r[axis], r["version"]): r for r in results}
    for x in sorted({r[axis] for r in results}):
        lo = by.get((x, "loop"))
        for v in versions:
            r = by.get((x, v))
            if r is None:
                continue
            if r["status"] != "ok":
                rows.append([str(x), v, r["status"], "-", fmt_bytes(r.get("estimate_bytes"))] + ["-"] * 6)
                continue
            sp = mr = "-"
            if v != "loop" and lo is not None and lo["status"] == "ok":
                sp = f"{lo['time_s'] / r['time_s']:.2f}x"
                mr = f"{lo['peak_bytes'] / max(r['peak_bytes'], 1):.2f}x"
            rows.append([str(x), v, fmt_time(r["time_s"]), fmt_bytes(r["peak_bytes"]), fmt_bytes(r.get("estimate_bytes")),
                         *(f"{100 * r['share'][c]:.0f}%" for c in CATEGORIES), sp, mr])
    notes = []
    for v in versions:
        best, why = largest_fit([r for r in results if r["version"] == v], budget, axis)
        notes.append(f"largest {lab} within --budget-mb {budget / MB:g} ({v}): " + (str(best) if best else "none")
                     + f" ({why})")
    for r in results:
        if r["status"] == "ok" and r["version"] == "constant":
            notes.append(f"{lab} {r[axis]} constant, per part (median s): " + constant_breakdown(r))
    for r in results:
        if r["status"] != "ok":
            notes.append(f"{lab} {r[axis]} {r['version']}: {r['status']}: {r.get('reason', '')}")
    title = f"{step}: one whole distillation iteration, {' vs '.join(versions)}"
    caption = ["time / iter = median of --repeat iterations after warm-up"
               + (" + CAM refresh / interval" if step == "mtt-edf" else "")
               + "; peak memory = peak above the process before the step's tensors existed "
                 "(VmHWM of a fresh child on CPU, max_memory_allocated on CUDA); network / CAM / losses / update = "
                 "share of the iteration; speedup and memory ratio = loop / this version"]
    return title, cols, rows, caption, notes


def constant_breakdown(r: dict) -> str:
    """One line: where the constant-memory version's iteration went (medians of the timed iterations)."""
    ps = r["parts_s"]
    fwd = ps.get("student unroll (net fwd+bwd)", 0.0)
    rev = [ps.get(k, 0.0) for k in ("reverse sweep: step replay (net fwd+bwd, graph)",
                                     "reverse sweep: vjp (net double backward)", "reverse sweep: rest")]
    return (f"forward sweep {fwd:.3f}, CPD {ps.get('CPD loss fwd+bwd', 0.0):.3f}, reverse sweep {sum(rev):.3f} "
            f"(step replay {rev[0]:.3f}, vjp {rev[1]:.3f}, rest {rev[2]:.3f}), DAE + update "
            f"{ps.get('DAE + update', 0.0):.3f}; reverse / forward sweep {sum(rev) / max(fwd, 1e-12):.2f}")


COLORS = {"loop": "tab:red", "edfkern": "tab:purple", "constant": "tab:green"}


def panels(step: str, results: list[dict], budget: float, axis: str = "ipc") -> list[Panel]:
    """The plot's row (:func:`edfkern.bench.report.plot_panels`): time per iteration and peak memory against
    the sweep's axis, one line per version, the estimates dotted and the budget dashed."""
    xlabel = "images per class (IPC)" if axis == "ipc" else "unrolled student steps (syn_steps)"
    time_p = Panel("time per iteration" + (" (+ CAM refresh / interval)" if step == "mtt-edf" else ""),
                   "seconds (median)", xlabel)
    mem_p = Panel("peak memory", "MB above the process before the step", xlabel, hline=(budget / MB, "--budget-mb"))
    for v in VERSIONS:
        pts = sorted((r for r in results if r["version"] == v and r["status"] == "ok"), key=lambda r: r[axis])
        if not pts:
            continue
        x = [r[axis] for r in pts]
        time_p.series.append(Series(v, x, [r["time_s"] for r in pts], color=COLORS[v]))
        mem_p.series.append(Series(v, x, [r["peak_bytes"] / MB for r in pts], color=COLORS[v]))
        est = sorted((r[axis], r["estimate_bytes"] / MB) for r in results if r["version"] == v and r.get("estimate_bytes"))
        if est:
            mem_p.series.append(Series(f"{v} (estimate from shapes)", [e[0] for e in est], [e[1] for e in est],
                                       color=COLORS[v], style=":", marker=None))
    return [time_p, mem_p]
