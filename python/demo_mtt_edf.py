"""Trajectory matching (MTT) + EDF on the real digits data set, once with the loop ops and once with edfkern.

1. Train a few expert ConvNets on the real training split, saving their parameters after every
   epoch (the expert trajectories).
2. Distill, as MTT / DATM / EDF do: start a student at an expert's epoch ``t``, train it
   ``syn_steps`` unrolled SGD steps on the synthetic images (with a learnable step size), and
   match the expert's epoch ``t + M`` with EDF's Common Pattern Dropout loss
   (``cpd_trajectory_loss``, ``drop_ratio``). EDF's Discriminative Area Enhancement scales the
   image gradient by a mask built from Smooth Grad-CAM++ maps, refreshed every ``interval``
   iterations, of a ConvNet trained on the real data (here: the first expert's final weights;
   EDF uses an ImageNet ResNet-18).

   * baseline run: per-class CAM loop (``edfkern.baselines.cams_per_class``, torchcam-0.4 style:
     clean forward, ``num_samples`` noisy forward + ``backward()`` passes per class), ``image_syn.grad *=
     baselines.create_soft_mask(...)``, ``torch.optim.SGD``, the authors' unrolled student (every step's
     graph kept, ``create_graph=True``) and ``baselines.cpd_trajectory_loss`` (full sort);
   * edfkern run: ``CAMExtractor`` (all images in one batched pass), ``DAESGD`` (mask fused into the
     SGD step) and ``edfkern.trajectory_matching_loss``: the same student steps and CPD loss, with the
     loop's exact gradient at constant memory (no graph of the ``syn_steps`` is kept).

Both runs use the same seed and the same noise draws, and the script reports the largest
difference between the two final synthetic sets, time per iteration, and held-out test accuracy
of ConvNets trained on the distilled set vs on the random real images it started from.

    python python/demo_mtt_edf.py           # full run (a few minutes on 2 CPU cores)
    python python/demo_mtt_edf.py --quick   # < 60 s smoke run (used as a test)

Distributed (CPU, gloo; NCCL on GPUs), checked on rank 0 against the single-process edfkern run:

    torchrun --nproc-per-node 2 python/demo_mtt_edf.py --distributed --quick

Layout: every student step's minibatch is split into one contiguous block of rows per rank
(``trajectory_matching_loss(..., process_group=pg)``); each step's gradient and each backward
product is all-reduced (P + 1 floats per step forward, 2P + 1 backward), so every rank gets the one-process gradient.
The synthetic images, the parameters and the CAMs are replicated. CAMs are not class-sharded here: ``CAMExtractor`` draws its smoothgrad noise for the
whole batch from one generator, so a class shard cannot reproduce the single-process noise.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

import _common as U  # noqa: E402  (sets sys.path for a checkout)

import edfkern  # noqa: E402
import edfkern.baselines as baselines  # noqa: E402
from edfkern.bench.step_models import FlatStudent  # noqa: E402
from edfkern.cam import CAMExtractor  # noqa: E402
from edfkern.optim import DAESGD  # noqa: E402

CAM_LAYER = "features.1"  # last conv block: (N, 32, 4, 4) maps for 16x16 digits


# ----------------------------------------------------------------------------- experts


def flat_params(net: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()


def train_expert(data: U.Digits, epochs: int, seed: int, lr: float) -> list[Tensor]:
    """MTT's buffer.py, small: plain SGD on the real train split, parameters saved every epoch."""
    net = U.seeded_net(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0)
    traj = [flat_params(net)]
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(U.augment(data.x_train[idx], g)), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        traj.append(flat_params(net))
    return traj


class Student(FlatStudent):
    """The demo's ConvNet evaluated from a flat parameter vector (MTT's ReparamModule), via torch.func."""

    def __init__(self) -> None:
        super().__init__(U.seeded_net(0))


def cam_model(flat: Tensor) -> torch.nn.Module:
    net = U.seeded_net(0)
    torch.nn.utils.vector_to_parameters(flat.clone(), net.parameters())
    return net.eval()


# ----------------------------------------------------------------------------- distillation


class Distiller:
    """One MTT+EDF run; ``step(it)`` does one iteration. The baseline and the edfkern run are
    stepped in lockstep, so a load change on the machine hits both timings alike."""

    def __init__(self, fused: bool, data: U.Digits, experts: list[list[Tensor]], args) -> None:
        self.fused, self.experts, self.args = fused, experts, args
        self.image_syn, self.label_syn = U.random_real_init(data, args.ipc, args.seed)
        self.image_syn.requires_grad_(True)
        self.syn_lr = torch.tensor(args.lr_teacher, requires_grad=True)  # MTT learns the student's lr
        if fused:
            self.opt_img = DAESGD([self.image_syn], lr=args.lr_img, momentum=0.5, beta=args.beta,
                                  threshold=args.threshold)
        else:
            self.opt_img = torch.optim.SGD([self.image_syn], lr=args.lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=args.lr_lr, momentum=0.5)
        self.student = Student()
        self.cam_net = cam_model(experts[0][-1])
        self.extractor = (CAMExtractor(self.cam_net, CAM_LAYER, num_samples=args.cam_samples, std=args.cam_std)
                          if fused else None)
        self.g = torch.Generator().manual_seed(args.seed + 7)
        self.g_cam = torch.Generator().manual_seed(args.seed + 8)
        self.t_iter, self.t_cam, self.t_student, self.t_dae = (U.Stopwatch() for _ in range(4))
        self.pg = None  # a process group: the student's minibatches are split over its ranks
        self.cams = None
        self.last = float("nan")

    def step(self, it: int) -> None:
        args, image_syn, label_syn = self.args, self.image_syn, self.label_syn
        K, ipc = U.NUM_CLASSES, args.ipc
        traj = self.experts[int(torch.randint(len(self.experts), (1,), generator=self.g))]
        t0 = int(torch.randint(args.max_start_epoch + 1, (1,), generator=self.g))
        start, target = traj[t0], traj[t0 + args.expert_epochs]
        order = [torch.randperm(K * ipc, generator=self.g)[:args.batch_syn] for _ in range(args.syn_steps)]
        with self.t_iter:
            if it % args.interval == 0:  # DAE: refresh the CAMs
                with self.t_cam:
                    if self.fused:
                        self.cams = self.extractor(image_syn, label_syn, generator=self.g_cam)
                        self.opt_img.set_cam(image_syn, self.cams)
                    else:
                        self.cams = baselines.cams_per_class(self.cam_net, self.cam_net.get_submodule(CAM_LAYER),
                                                             image_syn, ipc, num_samples=args.cam_samples,
                                                             std=args.cam_std, generator=self.g_cam)
            self.opt_img.zero_grad(set_to_none=True)
            self.opt_lr.zero_grad(set_to_none=True)
            with self.t_student:  # the student's syn_steps and the CPD loss, forward + backward
                if self.fused:  # exact gradient at constant memory: no graph of the syn_steps is kept
                    loss = edfkern.trajectory_matching_loss(self.student, image_syn, label_syn, start, target,
                                                            self.syn_lr, batches=order, drop_ratio=args.drop_ratio,
                                                            process_group=self.pg)
                    loss.backward()
                else:  # the authors' loop: every step's graph kept (create_graph=True), then the CPD block
                    w = start.clone().requires_grad_(True)
                    for idx in order:
                        ce = F.cross_entropy(self.student(w, image_syn[idx]), label_syn[idx])
                        (gw,) = torch.autograd.grad(ce, w, create_graph=True)
                        w = w - self.syn_lr * gw
                    loss = baselines.cpd_trajectory_loss(w, target, start, drop_ratio=args.drop_ratio)
                    loss.backward()
            with self.t_dae:  # DAE + the image step
                if self.fused:
                    self.opt_img.step()
                else:
                    image_syn.grad *= baselines.create_soft_mask(self.cams, tuple(image_syn.shape[-2:]), args.beta,
                                                                 args.threshold)
                    self.opt_img.step()
            self.opt_lr.step()
        self.last = float(loss.detach())

    def warm_up(self) -> None:
        """One untimed call of every op this run uses (a compiled backend loads on first use), on
        copies and throw-away RNGs, so the run's state and random streams are untouched."""
        args, g = self.args, torch.Generator().manual_seed(12345)
        x = self.image_syn.detach().clone()
        if self.fused:
            cams = self.extractor(x, self.label_syn, generator=g)
            edfkern.dae_sgd_step_(x, torch.zeros_like(x), torch.empty_like(x), cams, lr=0.0, beta=args.beta,
                                  momentum=0.5, first_step=True)
            x.requires_grad_(True)
            e = self.experts[0]
            edfkern.trajectory_matching_loss(self.student, x, self.label_syn, e[0], e[2], self.syn_lr.detach(),
                                             batches=[torch.arange(2)], drop_ratio=args.drop_ratio).backward()
        else:
            cams = baselines.cams_per_class(self.cam_net, self.cam_net.get_submodule(CAM_LAYER), x, args.ipc,
                                            num_samples=args.cam_samples, std=args.cam_std, generator=g)
            baselines.create_soft_mask(cams, tuple(x.shape[-2:]), args.beta, args.threshold)
            s = self.experts[0][1].clone().requires_grad_(True)
            baselines.cpd_trajectory_loss(s, self.experts[0][2], self.experts[0][0],
                                          drop_ratio=args.drop_ratio).backward()

    def close(self) -> None:
        if self.extractor is not None:
            self.extractor.close()


# ----------------------------------------------------------------------------- distributed


class DistDistiller(Distiller):
    """The edfkern run with every student step's minibatch split over the ranks of ``pg``."""

    def __init__(self, data: U.Digits, experts, args, pg) -> None:
        super().__init__(True, data, experts, args)
        self.pg = pg


def run_distributed(args, data: U.Digits, experts) -> int:
    pg, rank, world = U.init_gloo()
    mine = DistDistiller(data, experts, args, pg)
    one, ctrl, trace, rel_first = U.distributed_lockstep(
        mine, lambda: Distiller(True, data, experts, args), args, data, rank, desc=f"MTT+EDF on {world} ranks",
        gather=lambda: mine.image_syn.detach())
    ok = True
    if rank == 0:
        print(f"distributed MTT+EDF: {world} ranks (gloo); P = {experts[0][0].numel()}; each student step's "
              f"{args.batch_syn} images split over the ranks; per step one all-reduce of P + 1 floats forward and "
              "one of 2P + 1 backward")
        ok = U.report_distributed(trace, one.image_syn.detach(), mine.image_syn.detach(), ctrl, args.iters,
                                  rel_first, every=50, what="CPD loss")
        one.close()
    mine.close()
    edfkern.distributed.shutdown()
    return 0 if ok else 1


def main(argv=None) -> int:
    p = U.demo_parser(__doc__)
    p.add_argument("--experts", type=int, default=None, help="default 3; quick 2")
    p.add_argument("--expert-train-epochs", type=int, default=None, help="default 8; quick 3")
    p.add_argument("--expert-epochs", type=int, default=2, help="M: target is the expert at epoch t+M")
    p.add_argument("--max-start-epoch", type=int, default=None, help="default 5; quick 1")
    p.add_argument("--iters", type=int, default=None, help="default 200; quick 12")
    p.add_argument("--syn-steps", type=int, default=None, help="default 10; quick 5")
    p.add_argument("--batch-syn", type=int, default=None, help="default: all K*IPC images")
    p.add_argument("--lr-img", type=float, default=1000.0)
    p.add_argument("--lr-lr", type=float, default=1e-5)
    p.add_argument("--lr-teacher", type=float, default=0.05)
    p.add_argument("--drop-ratio", type=float, default=0.25, help="CPD (EDF: 0.25-0.5)")
    p.add_argument("--beta", type=float, default=1.0, help="DAE (EDF: 1 or 2)")
    p.add_argument("--threshold", type=float, default=None, help="DAE; None = per-image mean")
    p.add_argument("--interval", type=int, default=None, help="CAM refresh interval; default 50, quick 6")
    p.add_argument("--cam-samples", type=int, default=4)
    p.add_argument("--cam-std", type=float, default=0.3)
    p.add_argument("--distributed", action="store_true",
                   help="run under torchrun: student minibatches split over ranks; rank 0 compares with one process")
    args = p.parse_args(argv)
    U.finish_common_args(args)
    q = args.quick
    args.experts = args.experts or (2 if q else 3)
    args.expert_train_epochs = args.expert_train_epochs or (3 if q else 8)
    args.max_start_epoch = args.max_start_epoch if args.max_start_epoch is not None else (1 if q else 5)
    args.iters = args.iters or (12 if q else 200)
    args.syn_steps = args.syn_steps or (5 if q else 10)
    args.batch_syn = args.batch_syn or U.NUM_CLASSES * args.ipc
    args.interval = args.interval or (6 if q else 50)
    if args.max_start_epoch + args.expert_epochs > args.expert_train_epochs:
        p.error("max_start_epoch + expert_epochs must be <= expert_train_epochs")

    data = U.load_digits_split()
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, 1x16x16, 10 classes; "
          f"IPC {args.ipc}; torch threads {torch.get_num_threads()}")
    t = time.perf_counter()
    experts = [train_expert(data, args.expert_train_epochs, 100 + e, args.lr_teacher)
               for e in U.progress(range(args.experts), desc="experts")]
    expert_acc = U.accuracy(cam_model(experts[0][-1]), data.x_test, data.y_test)
    print(f"{args.experts} experts x {args.expert_train_epochs} epochs in {time.perf_counter() - t:.1f} s; "
          f"P = {experts[0][0].numel()} parameters; expert 0 (also the CAM model) test acc {expert_acc:.2f}%")

    if args.distributed:
        return run_distributed(args, data, experts)
    init_x, init_y = U.random_real_init(data, args.ipc, args.seed)
    base, fused, ctrl = U.start_lockstep(lambda f: Distiller(f, data, experts, args), args.ulp_control)
    first: dict[str, float] = {}

    def record_cams() -> None:  # same images and noise: the CAM paths agree up to rounding; so must one step
        first["cam_diff"] = float((base.cams - fused.cams).abs().max())

    trace, rel_first = U.run_lockstep(base, fused, ctrl, args.iters, init_x,
                                      desc="MTT+EDF (baseline and edfkern in lockstep)", on_first=record_cams)
    cam_diff = first["cam_diff"]
    base.close()
    fused.close()
    syn_b, syn_f = base.image_syn.detach(), fused.image_syn.detach()
    tb = (base.t_iter, base.t_cam, base.t_student, base.t_dae)
    tf = (fused.t_iter, fused.t_cam, fused.t_student, fused.t_dae)
    print(f"final CPD loss: baseline {base.last:.6g}, edfkern {fused.last:.6g}; learned lr: "
          f"{float(base.syn_lr):.5g} / {float(fused.syn_lr):.5g}; max |CAM difference| at the first refresh "
          f"{cam_diff:.3e}")

    acc_init, acc_b, acc_f = U.test_accuracies((init_x, syn_b, syn_f), init_y, data, args)

    def times(ts):
        it, cam, student, dae = ts
        return [f"{it.median_ms:.2f}", f"{cam.median_ms:.2f}", f"{student.median_ms:.2f}", f"{dae.median_ms:.3f}"]

    U.print_table(
        f"MTT + EDF (CPD drop {args.drop_ratio}, DAE beta {args.beta}) on digits, IPC {args.ipc}: held-out test "
        f"accuracy (%), mean +- std over {args.eval_runs} ConvNets trained {args.eval_epochs} epochs; "
        "times are medians",
        ["synthetic set", "test acc %", "ms / iteration", "CAM refresh ms", "student+CPD ms", "DAE+step ms"],
        [["random real init (no distillation)", U.fmt_acc(*acc_init), "-", "-", "-", "-"],
         ["MTT+EDF, baseline loops", U.fmt_acc(*acc_b), *times(tb)],
         ["MTT+EDF, " + U.describe_backend(), U.fmt_acc(*acc_f), *times(tf)]])
    return U.conclude(base, fused, ctrl, init_x, args.iters, trace, rel_first,
                      f"{tb[0].median_ms / tf[0].median_ms:.2f}x per iteration, "
                      f"{tb[1].median_ms / tf[1].median_ms:.2f}x CAM refresh, "
                      f"{tb[2].median_ms / tf[2].median_ms:.2f}x student+CPD (constant memory), "
                      f"{tb[3].median_ms / tf[3].median_ms:.2f}x DAE+step")


if __name__ == "__main__":
    import edfkern.distributed

    edfkern.distributed.exit_process(main())  # os._exit after a distributed run: see its docstring
