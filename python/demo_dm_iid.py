"""DM + IID distillation of the real digits data set, once with the loop ops and once with edfkern.

Per iteration, as DM does: a freshly initialised ConvNet (weights re-sampled every iteration),
a random real batch per class, and a gradient step on the synthetic images for

    loss = DM mean matching                                   (DM's loss_ori)
         + IID class centralization  on the flat embedding    (loss_insdis, weight 0.05)
         + IID covariance matching   on the local features    (loss_cov, weight 0.01)

The same seed runs twice: with ``edfkern.baselines`` (the per-class / per-sample loops of the
authors' code) and with edfkern's fused ops on the default backend. The script prints the largest
difference between the two final synthetic sets, the time per iteration, and held-out test
accuracy of ConvNets trained on the distilled set vs on the random real images it started from.

    python python/demo_dm_iid.py           # full run (a few minutes on 2 CPU cores)
    python python/demo_dm_iid.py --quick   # < 60 s smoke run (used as a test)
"""
from __future__ import annotations

import argparse
import types

import torch

import _common as U  # noqa: E402  (sets sys.path for a checkout)

import edfkern  # noqa: E402
import edfkern.baselines as baselines  # noqa: E402


def loss_ops(module) -> types.SimpleNamespace:
    return types.SimpleNamespace(mm=module.mean_matching_loss, cc=module.class_centralization_loss,
                                 cm=module.covariance_matching_loss)


def distill(ops, data: U.Digits, args, desc: str):
    """Returns (final synthetic images, iteration stopwatch, loss-only stopwatch, last loss)."""
    K = U.NUM_CLASSES
    image_syn, _ = U.random_real_init(data, args.ipc, args.seed)
    image_syn.requires_grad_(True)
    opt = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)  # DM's image optimizer
    g = torch.Generator().manual_seed(args.seed + 1)
    by_class = data.by_class()
    it_time, loss_time = U.Stopwatch(), U.Stopwatch()
    last = float("nan")
    for it in U.progress(range(args.iters), desc=desc):
        net = U.seeded_net(1_000_003 * args.seed + it)  # re-sampled every iteration, as DM does
        for p in net.parameters():
            p.requires_grad_(False)
        real = torch.cat([xc[torch.randperm(len(xc), generator=g)[:args.real_per_class]] for xc in by_class])
        with it_time:
            with torch.no_grad():
                loc_real = net.features(real)  # (K*n_real, C, h, w)
            loc_syn = net.features(image_syn)
            with loss_time:  # the DM/IID loss part alone, forward + backward to the features
                f = loc_syn.detach().requires_grad_(True)
                r = loc_real.flatten(2)  # (N, C, L): IID's local features
                loss = (ops.mm(f.flatten(1), r.flatten(1), syn_groups=K, real_groups=K)
                        + ops.cc(f.flatten(1), groups=K, weight=args.w_cc)
                        + ops.cm(f.flatten(2), r, syn_groups=K, real_groups=K, weight=args.w_cm))
                loss.backward()
            opt.zero_grad(set_to_none=True)
            loc_syn.backward(f.grad)
            opt.step()
        last = float(loss)
    return image_syn.detach(), it_time, loss_time, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a < 60 s smoke run")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iters", type=int, default=None, help="distillation iterations (default 1000; quick 40)")
    p.add_argument("--real-per-class", type=int, default=64)
    p.add_argument("--lr-img", type=float, default=1.0)
    p.add_argument("--w-cc", type=float, default=0.05)
    p.add_argument("--w-cm", type=float, default=0.01)
    p.add_argument("--eval-epochs", type=int, default=None, help="default 300; quick 100")
    p.add_argument("--eval-runs", type=int, default=None, help="default 5; quick 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.iters = args.iters or (40 if args.quick else 1000)
    args.eval_epochs = args.eval_epochs or (100 if args.quick else 300)
    args.eval_runs = args.eval_runs or (2 if args.quick else 5)
    U.set_threads(args.threads)

    data = U.load_digits_split()
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, 1x16x16, 10 classes; "
          f"IPC {args.ipc}, {args.iters} iterations; torch threads {torch.get_num_threads()}")

    init_x, init_y = U.random_real_init(data, args.ipc, args.seed)
    syn_base, t_base, l_base, loss_b = distill(loss_ops(baselines), data, args, "baseline loops")
    syn_fused, t_fused, l_fused, loss_f = distill(loss_ops(edfkern), data, args, "edfkern")
    max_diff = float((syn_base - syn_fused).abs().max())
    print(f"final loss: baseline {loss_b:.6g}, edfkern {loss_f:.6g}")

    kw = dict(epochs=args.eval_epochs, lr=0.01, runs=args.eval_runs)
    acc_init = U.mean_acc(init_x, init_y, data, **kw)
    acc_base = U.mean_acc(syn_base, init_y, data, **kw)
    acc_fused = U.mean_acc(syn_fused, init_y, data, **kw)

    U.print_table(
        f"DM + IID on digits, IPC {args.ipc}: held-out test accuracy (%), mean +- std over {args.eval_runs} "
        f"ConvNets trained {args.eval_epochs} epochs",
        ["synthetic set", "test acc %", "ms / iteration", "loss fwd+bwd ms"],
        [["random real init (no distillation)", U.fmt_acc(*acc_init), "-", "-"],
         ["DM+IID, baseline loops", U.fmt_acc(*acc_base), f"{t_base.mean_ms:.2f}", f"{l_base.mean_ms:.2f}"],
         ["DM+IID, " + U.describe_backend(), U.fmt_acc(*acc_fused), f"{t_fused.mean_ms:.2f}",
          f"{l_fused.mean_ms:.2f}"]])
    print(f"max |image_syn(baseline) - image_syn(edfkern)| = {max_diff:.3e} "
          f"(images are standardised, std 1); iteration speed-up {t_base.mean_ms / t_fused.mean_ms:.2f}x, "
          f"loss speed-up {l_base.mean_ms / l_fused.mean_ms:.2f}x")
    ok = max_diff < 1e-2 and all(map(lambda v: v == v, (loss_b, loss_f)))
    print("RESULT:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
