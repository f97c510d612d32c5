"""Shared pieces of the demos: the digits data set, a small ConvNet, training and evaluation, output.

Data: scikit-learn's ``load_digits`` (1797 real 8x8 grayscale handwritten digits, 10 classes,
shipped inside the scikit-learn wheel, so nothing is downloaded). Images are upsampled to
16x16 (bilinear), kept as 1 channel, standardised with the training split's mean and std,
and split 70/30 (stratified) into train and held-out test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # runnable as `python python/demo_*.py` from a checkout
    sys.path.insert(0, ROOT)

NUM_CLASSES = 10
IMAGE_SIZE = 16


@dataclass
class Digits:
    x_train: Tensor  # (N, 1, 16, 16), standardised
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor

    def by_class(self) -> list[Tensor]:
        return [self.x_train[self.y_train == c] for c in range(NUM_CLASSES)]


def load_digits_split(size: int = IMAGE_SIZE, test_fraction: float = 0.3, seed: int = 0) -> Digits:
    """The real digits data, upsampled to ``size`` and split into train / held-out test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed,
                                      stratify=y.numpy())
    idx_tr, idx_te = torch.as_tensor(idx_tr), torch.as_tensor(idx_te)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    return Digits(x[idx_tr], y[idx_tr], x[idx_te], y[idx_te])


class ConvNet(nn.Module):
    """DM/MTT's ConvNet, scaled down: ``depth`` x [conv3x3 - instance norm - ReLU - avgpool2].

    16x16 input, depth 2, width 32: local features (N, 32, 4, 4), flat embedding 512-d.
    """

    def __init__(self, channels: int = 1, num_classes: int = NUM_CLASSES, width: int = 32, depth: int = 2,
                 size: int = IMAGE_SIZE) -> None:
        super().__init__()
        blocks, c = [], channels
        for _ in range(depth):
            blocks.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1),
                                        nn.GroupNorm(width, width, affine=True),  # instance norm, as DM/MTT
                                        nn.ReLU(), nn.AvgPool2d(2)))
            c = width
            size //= 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))

    def embed(self, x: Tensor) -> Tensor:
        """DM's embedding: the flattened output of the last block."""
        return self.features(x).flatten(1)


def seeded_net(seed: int, **kw) -> ConvNet:
    """A ConvNet whose initial weights depend only on ``seed`` (not on the global RNG state)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ConvNet(**kw)
    finally:
        torch.random.set_rng_state(state)


def random_real_init(data: Digits, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """IPC random real training images per class, class-contiguous (the DD initialisation)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for xc in data.by_class():
        xs.append(xc[torch.randperm(len(xc), generator=g)[:ipc]])
    return torch.cat(xs).clone(), torch.arange(NUM_CLASSES).repeat_interleave(ipc)


def train_and_test(x: Tensor, y: Tensor, data: Digits, *, epochs: int, lr: float = 0.01, seed: int = 0,
                   batch_size: int = 256) -> float:
    """Train a fresh ConvNet on (x, y) with SGD (momentum 0.9, lr halved at epoch epochs//2, as DC/DM
    evaluation does) and return held-out test accuracy in percent."""
    net = seeded_net(10_000 + seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    x, y = x.detach(), y.detach()
    for ep in range(epochs):
        if ep == epochs // 2:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = augment(x[idx], g)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return accuracy(net, data.x_test, data.y_test)


def augment(x: Tensor, g: torch.Generator, max_shift: int = 1) -> Tensor:
    """A random shift of up to ``max_shift`` pixels per batch (a cheap stand-in for DSA)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    acc = (net(x).argmax(1) == y).float().mean().item() * 100
    net.train()
    return acc


def mean_acc(x: Tensor, y: Tensor, data: Digits, *, epochs: int, lr: float, runs: int) -> tuple[float, float]:
    accs = torch.tensor([train_and_test(x, y, data, epochs=epochs, lr=lr, seed=s) for s in range(runs)])
    return float(accs.mean()), float(accs.std()) if runs > 1 else 0.0


def progress(iterable, **kw):
    """tqdm progress bar on stderr (plain iteration if tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


class Stopwatch:
    """Wall time of each timed block: ``with sw: ...``; reports the median (robust to warm-up and
    to other load on the machine) and the mean."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.times.append(time.perf_counter() - self._t0)

    @property
    def count(self) -> int:
        return len(self.times)

    @property
    def median_ms(self) -> float:
        if not self.times:
            return float("nan")
        t = sorted(self.times)
        return 1e3 * t[(len(t) - 1) // 2]

    @property
    def mean_ms(self) -> float:
        return 1e3 * sum(self.times) / max(len(self.times), 1)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table on stdout (the demos' final report; tests parse it)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print()
    print(title)
    print(line)
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print(line)
    print(line)
    sys.stdout.flush()


def describe_backend() -> str:
    """e.g. ``edfkern default backend (auto -> native)``: the selection and the backend it resolves to on CPU."""
    import edfkern
    from edfkern._dispatch import kernel

    try:
        mod = kernel("dae_", torch.device("cpu")).__module__.split(".")
        chosen = mod[1] if len(mod) > 1 else mod[0]
    except Exception:  # pragma: no cover - report, never fail the demo over a label
        chosen = "?"
    return f"edfkern default backend ({edfkern.current_backend()} -> {chosen})"


def fmt_acc(mean: float, std: float) -> str:
    return f"{mean:.2f} +- {std:.2f}"


def set_threads(n: Optional[int] = None) -> None:
    if n:
        torch.set_num_threads(n)


Op = Callable[..., Tensor]


def nudge_one_ulp(distiller) -> None:
    """The control run of --ulp-control: the same start, every pixel one ulp larger."""
    with torch.no_grad():
        x = distiller.image_syn
        x.copy_(torch.nextafter(x, torch.full_like(x, float("inf"))))


def start_lockstep(make, ulp_control: bool):
    """``(base, fused, ctrl)``: the baseline and edfkern runs (``make(fused)``), warmed up, and with
    ``ulp_control`` the control run (a baseline from initial images one ulp larger), else None."""
    base, fused = make(False), make(True)
    base.warm_up()
    fused.warm_up()
    ctrl = make(False) if ulp_control else None
    if ctrl is not None:
        nudge_one_ulp(ctrl)
    return base, fused, ctrl


def run_lockstep(base, fused, ctrl, iters: int, init_x: torch.Tensor, desc: str, on_first=None):
    """Step the baseline, edfkern (and the optional control) runs together, so load hits them alike.

    Returns ``(trace, rel_first)``: the max image difference at iterations 1, 10, 100 and the last,
    and ||difference|| / ||update|| after the first iteration (rounding-level when the ops agree).
    ``on_first()`` runs after the first iteration (e.g. to record the CAM difference).
    """
    rel_first = float("nan")
    trace: list[tuple[int, float]] = []
    for it in progress(range(iters), desc=desc):
        base.step(it)
        fused.step(it)
        if ctrl is not None:
            ctrl.step(it)
        if it + 1 in (1, 10, 100) or it + 1 == iters:  # how rounding differences grow
            trace.append((it + 1, float((base.image_syn - fused.image_syn).abs().max())))
        if it == 0:
            if on_first is not None:
                on_first()
            step_norm = float((base.image_syn.detach() - init_x).norm())
            rel_first = float((base.image_syn.detach() - fused.image_syn.detach()).norm()) / max(step_norm, 1e-30)
    return trace, rel_first


def test_accuracies(images: Sequence[Tensor], labels: Tensor, data: Digits, args) -> list[tuple[float, float]]:
    """(mean, std) held-out accuracy of each synthetic set in ``images`` (``--eval-epochs``, ``--eval-runs``)."""
    return [mean_acc(x, labels, data, epochs=args.eval_epochs, lr=0.01, runs=args.eval_runs) for x in images]


def conclude(base, fused, ctrl, init_x: torch.Tensor, iters: int, trace, rel_first: float, speedups: str) -> int:
    """The end of a single-process demo: how far the baseline and edfkern runs ended apart (and the 1-ulp
    control if it ran), the ``speedups`` line, and ``RESULT: OK`` when the runs agree (first-iteration
    difference at rounding level, no NaN loss), else ``RESULT: MISMATCH``. Returns the exit code."""
    report_agreement(base, fused, ctrl, init_x, iters, trace, rel_first)
    print(f"speed-up of edfkern over the loops: {speedups}")
    ok = rel_first < 1e-2 and base.last == base.last and fused.last == fused.last
    print("RESULT:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def report_agreement(base, fused, ctrl, init_x: torch.Tensor, iters: int, trace, rel_first: float) -> None:
    """Print how far the baseline and edfkern runs ended apart, and the 1-ulp control if it ran."""
    syn_b, syn_f = base.image_syn.detach(), fused.image_syn.detach()
    max_diff = float((syn_b - syn_f).abs().max())
    print(f"max |image_syn(baseline) - image_syn(edfkern)| = {max_diff:.3e} after {iters} iterations "
          f"(images are standardised, std 1); after the first iteration ||difference|| / ||update|| = "
          f"{rel_first:.2e}")
    rel_final = float((syn_b - syn_f).norm()) / max(float((syn_b - init_x).norm()), 1e-30)
    print("max |difference| by iteration: " + ", ".join(f"{i}: {d:.2e}" for i, d in trace)
          + f"; at the end ||difference|| / ||total change of the images|| = {rel_final:.2e}")
    if ctrl is not None:
        print(f"control: max |image_syn(baseline) - image_syn(baseline, initial images +1 ulp)| = "
              f"{float((base.image_syn - ctrl.image_syn).abs().max()):.3e} after {iters} iterations")


def init_gloo():
    """Join the ``--distributed`` demo's gloo process group (torchrun's environment): (group, rank, world size)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()


def distributed_lockstep(mine, make_single: Callable[[], object], args, data: Digits, rank: int, desc: str,
                         gather: Callable[[], Tensor]):
    """Step this rank's share of a ``--distributed`` demo (``mine``) and, on rank 0, the single-process
    edfkern run (``make_single()``) and the optional 1-ulp control in lockstep.

    ``gather()`` gives the distributed run's whole synthetic set; it is called on every rank after the
    first iteration (it may be a collective). Returns ``(one, ctrl, trace, rel_first)``: the single-process
    and control runs (None off rank 0), ``(iteration, single-process loss, distributed loss)`` per
    iteration, and ||difference|| / ||update|| after the first iteration (rank 0; NaN elsewhere).
    """
    one = make_single() if rank == 0 else None
    ctrl = make_single() if (rank == 0 and args.ulp_control) else None
    if ctrl is not None:  # the rounding floor: the single-process run from initial images 1 ulp larger
        nudge_one_ulp(ctrl)
    init_x, _ = random_real_init(data, args.ipc, args.seed)
    trace: list[tuple[int, float, float]] = []
    rel_first = float("nan")
    for it in progress(range(args.iters), desc=desc, disable=rank != 0):
        mine.step(it)
        whole = gather() if it == 0 else None
        if one is not None:
            one.step(it)
            if ctrl is not None:
                ctrl.step(it)
            trace.append((it + 1, one.last, mine.last))
            if it == 0:
                step = float((one.image_syn.detach() - init_x).norm())
                rel_first = float((one.image_syn.detach() - whole).norm()) / max(step, 1e-30)
    return one, ctrl, trace, rel_first


def report_distributed(trace, single_images: torch.Tensor, dist_images: torch.Tensor, ctrl, iters: int,
                       rel_first: float, every: int, what: str = "loss") -> bool:
    """Rank 0 of a ``--distributed`` demo: the single-process and distributed runs' losses at a few
    iterations, how far their images ended apart, the 1-ulp control if it ran, and the verdict.

    ``trace`` holds ``(iteration, single-process loss, distributed loss)``; returns whether the runs
    agree (first-iteration difference at rounding level, no NaN loss) and prints ``RESULT:``.
    """
    for it, l1, ld in trace:
        if it in (1, 2, 10) or it == iters or it % every == 0:
            print(f"iteration {it}: {what} single-process {l1:.9g}, distributed {ld:.9g}")
    diff = float((single_images - dist_images).abs().max())
    print(f"max |image_syn(single process) - image_syn(distributed)| = {diff:.3e} after {iters} iterations; "
          f"after the first iteration ||difference|| / ||update|| = {rel_first:.2e}")
    if ctrl is not None:
        print(f"control: max |image_syn(single process) - image_syn(single process, initial images +1 ulp)| = "
              f"{float((single_images - ctrl.image_syn.detach()).abs().max()):.3e} after {iters} iterations")
    ok = rel_first < 1e-2 and all(l1 == l1 and ld == ld for _, l1, ld in trace)
    print("RESULT:", "OK" if ok else "MISMATCH")
    return ok


def demo_parser(doc: str) -> argparse.ArgumentParser:
    """A demo's parser with the options both demos share: --quick, IPC, evaluation, seed, the 1-ulp control
    run and threads (the demo adds its own)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a < 60 s smoke run")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--eval-epochs", type=int, default=None, help="default 300; quick 100")
    p.add_argument("--eval-runs", type=int, default=None, help="default 5; quick 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ulp-control", action="store_true",
                   help="also step a baseline run whose initial images are 1 ulp larger, to show how far "
                        "rounding alone moves the result (the floor for the baseline-vs-edfkern difference)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: robust timings on a small, shared machine)")
    return p


def finish_common_args(args) -> None:
    """Quick-mode defaults of the shared options, and the thread count."""
    args.eval_epochs = args.eval_epochs or (100 if args.quick else 300)
    args.eval_runs = args.eval_runs or (2 if args.quick else 5)
    set_threads(args.threads)
