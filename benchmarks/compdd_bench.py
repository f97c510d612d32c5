"""Comp-DD complexity scoring: the authors' released pipeline vs ``edfkern.compdd.score``, on CPU.

    python benchmarks/compdd_bench.py [--images 256] [--batch-size 32] [--json out.json]

A generated data set (small random images over a few classes) and a small 4-stage ConvNet
(``layer1`` .. ``layer4`` at 32, 16, 8, 4 px). Two pipelines, each in its own subprocess so
its peak memory (max RSS) is its own:

* **released** (the authors' way, written here from their description): for every batch and
  every layer, a fresh torchcam 0.4 ``SmoothGradCAMpp`` on that one layer (its own clean and
  noisy passes), the predicted class, one ``.npy`` file per image per layer; then a process
  pool reads every file back and computes ``1 - fraction of pixels > 0.5``; per-class means.
* **edfkern**: ``edfkern.compdd.score`` over the same loader: one set of passes for all layers,
  sums on the device, nothing written.

Same noise: torchcam draws its noise from the global RNG; the released run reseeds it to
``seed + batch`` before each layer's extractor, and edfkern is given the same draws through
``score(noise=...)``. So both must give the same per-class complexity; the script reports the
largest difference. Needs torchcam 0.4.0 (``pip install --no-deps torchcam==0.4.0``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS = ["layer1", "layer2", "layer3", "layer4"]
SEED = 1234
NUM_SAMPLES, STD, THRESHOLD = 4, 0.3, 0.5


def convnet(num_classes: int) -> nn.Module:
    torch.manual_seed(0)

    def stage(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    m = nn.Sequential()
    m.add_module("layer1", stage(3, 16, 1))
    m.add_module("layer2", stage(16, 32, 2))
    m.add_module("layer3", stage(32, 64, 2))
    m.add_module("layer4", stage(64, 64, 2))
    m.add_module("pool", nn.AdaptiveAvgPool2d(1))
    m.add_module("flatten", nn.Flatten())
    m.add_module("fc", nn.Linear(64, num_classes))
    return m.eval()


def dataset(n: int, num_classes: int):
    from edfkern.compdd._cli import TensorImages

    g = torch.Generator().manual_seed(0)
    return TensorImages(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % num_classes)


# ----------------------------------------------------------------------------- the released way


def _file_complexity(path: str) -> float:
    m = np.load(path)
    return 1.0 - float((m > THRESHOLD).mean())


def released(model: nn.Module, loader: DataLoader, num_classes: int, workdir: str, workers: int) -> dict:
    from torchcam.methods import SmoothGradCAMpp

    files: dict[str, list[tuple[str, int]]] = {name: [] for name in LAYERS}
    for name in LAYERS:
        os.makedirs(os.path.join(workdir, name), exist_ok=True)
    i0 = 0
    for b, (x, y) in enumerate(loader):
        for name in LAYERS:  # one extractor per batch and layer, its own noisy passes
            cam = SmoothGradCAMpp(model, target_layer=name, num_samples=NUM_SAMPLES, std=STD,
                                  input_shape=tuple(x.shape[1:]))
            torch.manual_seed(SEED + b)
            scores = model(x)
            maps = cam(scores.argmax(1).tolist(), scores)[0].detach().cpu().numpy()
            cam.remove_hooks()
            for j in range(x.shape[0]):
                path = os.path.join(workdir, name, f"{i0 + j}.npy")
                np.save(path, maps[j])
                files[name].append((path, int(y[j])))
        model.zero_grad(set_to_none=True)
        i0 += x.shape[0]
    sums = np.zeros((num_classes, len(LAYERS)))
    counts = np.zeros(num_classes)
    with get_context("fork").Pool(workers) as pool:  # the authors read the files back with a 40-process pool
        for j, name in enumerate(LAYERS):
            values = pool.map(_file_complexity, [p for p, _ in files[name]], chunksize=16)
            for (_, label), v in zip(files[name], values):
                sums[label, j] += v
                if j == 0:
                    counts[label] += 1
    return {"complexity": (sums / counts[:, None]).tolist(), "files": sum(len(v) for v in files.values())}


# ----------------------------------------------------------------------------- edfkern


def edfkern_score(model: nn.Module, loader: DataLoader, batch_size: int) -> dict:
    import edfkern.compdd as compdd

    def same_noise(indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED + int(indices[0]) // batch_size)  # the released run's draws
        return torch.stack([torch.randn(images.shape, generator=g) for _ in range(NUM_SAMPLES)])

    res = compdd.score(model, loader, layers=LAYERS, num_samples=NUM_SAMPLES, std=STD, threshold=THRESHOLD,
                       noise=same_noise, progress=False)
    return {"complexity": res.complexity.tolist(), "files": 0}


# ----------------------------------------------------------------------------- driver


def run_one(which: str, n: int, classes: int, batch_size: int, workers: int) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = convnet(classes)
    ds = dataset(n, classes)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    warm = DataLoader(dataset(batch_size, classes), batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up on one batch (loads torchcam / the edfkern extension), not timed
        if which == "released":
            released(model, warm, classes, os.path.join(tmp, "warm"), workers)
        else:
            edfkern_score(model, warm, batch_size)
        base_mb = _rss_now_mb()
        t0 = time.perf_counter()
        if which == "released":
            out = released(model, loader, classes, os.path.join(tmp, "run"), workers)
        else:
            out = edfkern_score(model, loader, batch_size)
        dt = time.perf_counter() - t0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.update(seconds=dt, images_per_s=n / dt, peak_rss_mb=self_kb / 1024, rss_before_mb=base_mb,
               peak_rss_children_mb=child_kb / 1024 if which == "released" else 0.0)
    return out


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="the released pipeline's reading pool")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--only", choices=["released", "edfkern"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print(json.dumps(run_one(a.only, a.images, a.classes, a.batch_size, a.workers)))
        return
    results = {}
    for which in ("released", "edfkern"):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", which, "--images", str(a.images),
               "--classes", str(a.classes), "--batch-size", str(a.batch_size), "--workers", str(a.workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"{which} failed:\n{proc.stderr}")
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    r, e = results["released"], results["edfkern"]
    diff = float(np.abs(np.array(r["complexity"]) - np.array(e["complexity"])).max())
    print(f"{a.images} images {a.classes} classes 32x32, batch {a.batch_size}, layers {','.join(LAYERS)}, "
          f"smoothgradcam++ S={NUM_SAMPLES} std={STD}, threads={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"{'pipeline':10s} {'images/s':>9s} {'seconds':>8s} {'files':>6s} {'peak RSS MB':>12s} "
          f"{'run adds MB':>12s} {'pool peak MB':>13s}")
    for name, x in results.items():
        print(f"{name:10s} {x['images_per_s']:9.1f} {x['seconds']:8.2f} {x['files']:6d} {x['peak_rss_mb']:12.0f} "
              f"{max(0.0, x['peak_rss_mb'] - x['rss_before_mb']):12.0f} {x['peak_rss_children_mb']:13.0f}")
    print("(peak RSS: the whole process, imports included; run adds: peak minus the RSS just before the timed run; "
          "pool peak: the largest reader process of the released pipeline)")
    print(f"speed-up {e['images_per_s'] / r['images_per_s']:.2f}x; largest per-class complexity difference {diff:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results, "max_abs_diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
