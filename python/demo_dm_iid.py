"""DM + IID distillation of the real digits data set, once with the loop ops and once with edfkern.

Per iteration, as DM does: a freshly initialised ConvNet (weights re-sampled every iteration),
a random real batch per class, and a gradient step on the synthetic images for

    loss = DM mean matching                                   (DM's loss_ori)
         + IID class centralization  on the flat embedding    (loss_insdis, weight 0.001 here)
         + IID covariance matching   on the local features    (loss_cov, weight 0.01, IID's)

IID computes CC on a pretrained ResNet-18's 512-d features with weight 0.05. Here CC runs on the
random ConvNet's 512-d embedding, whose squared distances are far larger, and weight 0.05 made the
synthetic images collapse toward their class means (measured, 300 iterations, 3 evaluation runs:
92.5% test accuracy vs 97.5% without CC, 96.4% at 0.005, 97.5% at 0.001), so the demo uses 0.001.

The same seed runs twice: with ``edfkern.baselines`` (the per-class / per-sample loops of the
authors' code) and with edfkern's fused ops on the default backend. The script prints the largest
difference between the two final synthetic sets, the time per iteration, and held-out test
accuracy of ConvNets trained on the distilled set vs on the random real images it started from.

    python python/demo_dm_iid.py           # full run (a few minutes on 2 CPU cores)
    python python/demo_dm_iid.py --quick   # < 60 s smoke run (used as a test)

Distributed (CPU, gloo; NCCL on GPUs): the same distillation over the ranks of a ``torchrun`` world,
with the ops given a process group, checked on rank 0 against the single-process edfkern run:

    torchrun --nproc-per-node 2 python/demo_dm_iid.py --distributed --quick                  # row-sharded
    torchrun --nproc-per-node 2 python/demo_dm_iid.py --distributed --quick --layout classes # class-sharded

``rows``: the synthetic images and the real batch of every class are split over the ranks (image j
of a class on rank j mod W), so every class statistic crosses ranks. ``classes``: each rank owns
whole classes (``edfkern.distributed.shard_classes``). Either way every rank steps only its own
images, and the losses equal those of one process on the union.
"""
from __future__ import annotations

import types

import torch

import _common as U  # noqa: E402  (sets sys.path for a checkout)

import edfkern  # noqa: E402
import edfkern.baselines as baselines  # noqa: E402


def loss_ops(module) -> types.SimpleNamespace:
    return types.SimpleNamespace(mm=module.mean_matching_loss, cc=module.class_centralization_loss,
                                 cm=module.covariance_matching_loss)


class Distiller:
    """One DM+IID run; ``step(it)`` does one iteration. Two of these (baseline ops, edfkern ops) are
    stepped in lockstep, so a load change on the machine hits both timings alike."""

    def __init__(self, ops, data: U.Digits, args) -> None:
        self.ops, self.data, self.args = ops, data, args
        self.image_syn, _ = U.random_real_init(data, args.ipc, args.seed)
        self.image_syn.requires_grad_(True)
        self.opt = torch.optim.SGD([self.image_syn], lr=args.lr_img, momentum=0.5)  # DM's image optimizer
        self.g = torch.Generator().manual_seed(args.seed + 1)
        self.by_class = data.by_class()
        self.it_time, self.loss_time = U.Stopwatch(), U.Stopwatch()
        self.last = float("nan")

    def warm_up(self) -> None:
        """One untimed call of each loss (a compiled backend loads on first use) on random features."""
        g = torch.Generator().manual_seed(12345)
        f = torch.randn(U.NUM_CLASSES * self.args.ipc, 4, 3, generator=g, requires_grad=True)
        r = torch.randn(U.NUM_CLASSES * 4, 4, 3, generator=g)
        K = U.NUM_CLASSES
        (self.ops.mm(f.flatten(1), r.flatten(1), syn_groups=K, real_groups=K) + self.ops.cc(f.flatten(1), groups=K)
         + self.ops.cm(f, r, syn_groups=K, real_groups=K)).backward()

    def step(self, it: int) -> None:
        K, args, ops = U.NUM_CLASSES, self.args, self.ops
        net = U.seeded_net(1_000_003 * args.seed + it)  # re-sampled every iteration, as DM does
        for p in net.parameters():
            p.requires_grad_(False)
        real = torch.cat([xc[torch.randperm(len(xc), generator=self.g)[:args.real_per_class]]
                          for xc in self.by_class])
        with self.it_time:
            with torch.no_grad():
                loc_real = net.features(real)  # (K*n_real, C, h, w)
            loc_syn = net.features(self.image_syn)
            with self.loss_time:  # the DM/IID loss part alone, forward + backward to the features
                f = loc_syn.detach().requires_grad_(True)
                r = loc_real.flatten(2)  # (N, C, L): IID's local features
                loss = (ops.mm(f.flatten(1), r.flatten(1), syn_groups=K, real_groups=K)
                        + ops.cc(f.flatten(1), groups=K, weight=args.w_cc)
                        + ops.cm(f.flatten(2), r, syn_groups=K, real_groups=K, weight=args.w_cm))
                loss.backward()
            self.opt.zero_grad(set_to_none=True)
            loc_syn.backward(f.grad)
            self.opt.step()
        self.last = float(loss.detach())


# ----------------------------------------------------------------------------- distributed


def _dist_op(name: str):
    """``edfkern.<name>`` when it takes ``process_group=`` (the public way), else ``edfkern.distributed.<name>``."""
    import inspect

    import edfkern.distributed as ED

    op = getattr(edfkern, name)
    return op if "process_group" in inspect.signature(op).parameters else getattr(ED, name)


class DistDistiller:
    """The edfkern run of :class:`Distiller` on one rank of a world: the same RNG streams on every rank,
    each rank keeping and stepping only its own synthetic images and real rows."""

    def __init__(self, data: U.Digits, args, pg, layout: str) -> None:
        from edfkern.distributed import shard_classes, world

        self.args, self.pg = args, pg
        self.rank, self.world = world(pg)
        K, ipc = U.NUM_CLASSES, args.ipc
        self.owned = set(shard_classes(K, group=pg)) if layout == "classes" else set(range(K))
        self.layout = layout
        full, labels = U.random_real_init(data, ipc, args.seed)
        self.rows = torch.tensor([i for i in range(K * ipc) if self._mine(int(labels[i]), i % ipc)], dtype=torch.long)
        self.labels = labels[self.rows]
        self.image_syn = full[self.rows].clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.image_syn], lr=args.lr_img, momentum=0.5)  # per element: as one process
        self.g = torch.Generator().manual_seed(args.seed + 1)
        self.by_class = data.by_class()
        self.ops = {n: _dist_op(n) for n in ("mean_matching_loss", "class_centralization_loss",
                                             "covariance_matching_loss")}
        self.it_time = U.Stopwatch()
        self.last = float("nan")

    def _mine(self, k: int, j: int) -> bool:
        return k in self.owned if self.layout == "classes" else j % self.world == self.rank

    def step(self, it: int) -> None:
        K, args, pg = U.NUM_CLASSES, self.args, self.pg
        net = U.seeded_net(1_000_003 * args.seed + it)
        for p in net.parameters():
            p.requires_grad_(False)
        picks = [xc[torch.randperm(len(xc), generator=self.g)[:args.real_per_class]] for xc in self.by_class]
        real = torch.cat([xb[j:j + 1] for k, xb in enumerate(picks) for j in range(len(xb)) if self._mine(k, j)])
        y_real = torch.tensor([k for k, xb in enumerate(picks) for j in range(len(xb)) if self._mine(k, j)])
        with self.it_time:
            with torch.no_grad():
                r = net.features(real).flatten(2)
            loc_syn = net.features(self.image_syn)
            f = loc_syn.detach().requires_grad_(True)
            mm, cc, cm = (self.ops[n] for n in ("mean_matching_loss", "class_centralization_loss",
                                                "covariance_matching_loss"))
            loss = (mm(f.flatten(1), r.flatten(1), syn_groups=self.labels, real_groups=y_real, num_groups=K,
                       process_group=pg)
                    + cc(f.flatten(1), groups=self.labels, num_groups=K, weight=args.w_cc, process_group=pg)
                    + cm(f.flatten(2), r, syn_groups=self.labels, real_groups=y_real, num_groups=K, weight=args.w_cm,
                         process_group=pg))
            loss.backward()
            self.opt.zero_grad(set_to_none=True)
            loc_syn.backward(f.grad)
            self.opt.step()
        self.last = float(loss.detach())

    def full_images(self) -> torch.Tensor:
        """The whole synthetic set on every rank (zero-padded rows summed over ranks: exact)."""
        from edfkern.distributed import all_reduce_sum_

        full = torch.zeros((U.NUM_CLASSES * self.args.ipc,) + tuple(self.image_syn.shape[1:]))
        full[self.rows] = self.image_syn.detach()
        return all_reduce_sum_([full], group=self.pg, what="demo image gather")[0]


def run_distributed(args, data: U.Digits) -> int:
    """Every rank steps its share; rank 0 also steps the single-process edfkern run and compares."""
    pg, rank, world = U.init_gloo()
    mine = DistDistiller(data, args, pg, args.layout)
    one, ctrl, trace, rel_first = U.distributed_lockstep(
        mine, lambda: Distiller(loss_ops(edfkern), data, args), args, data, rank,
        desc=f"DM+IID on {world} ranks ({args.layout})", gather=mine.full_images)
    full = mine.full_images()
    ok = True
    if rank == 0:
        print(f"distributed DM+IID: {world} ranks (gloo), layout {args.layout}; rank 0 holds "
              f"{len(mine.rows)} of {U.NUM_CLASSES * args.ipc} synthetic images")
        ok = U.report_distributed(trace, one.image_syn.detach(), full, ctrl, args.iters, rel_first, every=100)
        print(f"ms / iteration (median): single process {one.it_time.median_ms:.2f}, distributed rank 0 "
              f"{mine.it_time.median_ms:.2f}")
    edfkern.distributed.shutdown()
    return 0 if ok else 1


def main(argv=None) -> int:
    p = U.demo_parser(__doc__)
    p.add_argument("--iters", type=int, default=None, help="distillation iterations (default 500; quick 25)")
    p.add_argument("--real-per-class", type=int, default=64)
    p.add_argument("--lr-img", type=float, default=1.0)
    p.add_argument("--w-cc", type=float, default=0.001,
                   help="CC weight (IID: 0.05 on pretrained ResNet-18 features; see the module docstring)")
    p.add_argument("--w-cm", type=float, default=0.01, help="CM weight (IID: 0.01; IDM+IID: 0.03)")
    p.add_argument("--distributed", action="store_true",
                   help="run under torchrun: the ops get a process group; rank 0 compares with one process")
    p.add_argument("--layout", choices=("rows", "classes"), default="rows",
                   help="--distributed: split every class over the ranks (rows) or give each rank whole classes")
    args = p.parse_args(argv)
    U.finish_common_args(args)
    args.iters = args.iters or (25 if args.quick else 500)

    data = U.load_digits_split()
    if args.distributed:
        return run_distributed(args, data)
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, 1x16x16, 10 classes; "
          f"IPC {args.ipc}, {args.iters} iterations; torch threads {torch.get_num_threads()}")

    init_x, init_y = U.random_real_init(data, args.ipc, args.seed)
    base, fused, ctrl = U.start_lockstep(lambda f: Distiller(loss_ops(edfkern if f else baselines), data, args),
                                         args.ulp_control)
    trace, rel_first = U.run_lockstep(base, fused, ctrl, args.iters, init_x,
                                      desc="DM+IID (baseline and edfkern in lockstep)")
    syn_base, syn_fused = base.image_syn.detach(), fused.image_syn.detach()
    t_base, l_base, t_fused, l_fused = base.it_time, base.loss_time, fused.it_time, fused.loss_time
    print(f"final loss: baseline {base.last:.6g}, edfkern {fused.last:.6g}")

    acc_init, acc_base, acc_fused = U.test_accuracies((init_x, syn_base, syn_fused), init_y, data, args)

    U.print_table(
        f"DM + IID on digits, IPC {args.ipc}: held-out test accuracy (%), mean +- std over {args.eval_runs} "
        f"ConvNets trained {args.eval_epochs} epochs",
        ["synthetic set", "test acc %", "ms / iteration (median)", "loss fwd+bwd ms (median)"],
        [["random real init (no distillation)", U.fmt_acc(*acc_init), "-", "-"],
         ["DM+IID, baseline loops", U.fmt_acc(*acc_base), f"{t_base.median_ms:.2f}", f"{l_base.median_ms:.2f}"],
         ["DM+IID, " + U.describe_backend(), U.fmt_acc(*acc_fused), f"{t_fused.median_ms:.2f}",
          f"{l_fused.median_ms:.2f}"]])
    return U.conclude(base, fused, ctrl, init_x, args.iters, trace, rel_first,
                      f"{t_base.median_ms / t_fused.median_ms:.2f}x per iteration, "
                      f"{l_base.median_ms / l_fused.median_ms:.2f}x for the loss forward+backward")


if __name__ == "__main__":
    import edfkern.distributed

    edfkern.distributed.exit_process(main())  # os._exit after a distributed run: see its docstring
