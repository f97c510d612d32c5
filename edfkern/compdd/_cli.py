"""``python -m edfkern.compdd``: score class complexity from the command line (also under ``torchrun``).

    python -m edfkern.compdd score --data DIR_OR_FILE --model MODULE:CALLABLE \\
        --layers layer1,layer2,layer3,layer4 --out results/ [--resume]
    python -m edfkern.compdd subsets
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ._storage import check_output, error_line, load_npz, load_torch

__all__ = ["main", "TensorImages", "load_data", "load_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TensorImages(Dataset):
    """Images ``(N, C, H, W)`` and integer labels ``(N,)`` held in memory; ``.targets`` is the labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a floating tensor (N, C, H, W), got {got}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be N={images.shape[0]} integers, got {labels.dtype} {tuple(labels.shape)}")
        self.images, self.targets = images, labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


def _tensor_images(path: str, images: Any, labels: Any) -> "TensorImages":
    try:
        return TensorImages(images, labels)
    except ValueError as e:
        raise ValueError(f"--data {path}: {e}") from None


def load_data(path: str, image_size: int = 224) -> Dataset:
    """A tensor file (``.pt``: ``{"images", "labels"}`` or ``(images, labels)``; ``.npz``: arrays
    ``images`` and ``labels``), or an image folder (one sub-folder per class, torchvision
    ``ImageFolder``; resized to ``image_size`` without crop, ImageNet normalisation, as the authors).

    Every unreadable file (empty, truncated, foreign, a pickle of other classes) is one ``ValueError``."""
    if os.path.isfile(path):
        if path.endswith(".npz"):
            import numpy as np

            z = load_npz(path, "--data", ("images", "labels"))
            for key, kinds in (("images", "f"), ("labels", "iu")):
                if z[key].dtype.kind not in kinds:
                    raise ValueError(f"--data {path}: {key} must be {'floating' if kinds == 'f' else 'integer'}, "
                                     f"got {z[key].dtype}")
            return _tensor_images(path, torch.from_numpy(np.ascontiguousarray(z["images"])),
                                  torch.from_numpy(np.ascontiguousarray(z["labels"])))
        if path.endswith(".pt"):
            obj = load_torch(path, "--data")
            if isinstance(obj, dict) and "images" in obj and "labels" in obj:
                return _tensor_images(path, obj["images"], obj["labels"])
            if isinstance(obj, (tuple, list)) and len(obj) == 2:
                return _tensor_images(path, obj[0], obj[1])
            raise ValueError(f"--data {path}: a .pt file must hold {{'images': ..., 'labels': ...}} or (images, labels)")
        raise ValueError(f"--data {path}: a file must be .pt or .npz (images and labels); a folder is read as ImageFolder")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise ValueError("--data: reading an image folder needs torchvision (pip install torchvision); or pass a "
                         "tensor file (.pt with {'images', 'labels'}, or .npz with arrays images and labels)") from None
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return datasets.ImageFolder(path, transform=tf)


def load_model(spec: str) -> nn.Module:
    """``MODULE:CALLABLE`` (e.g. ``mypkg.models:pretrained_resnet18``): import, call with no arguments."""
    if spec.count(":") != 1:
        raise ValueError(f"--model must be MODULE:CALLABLE, got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001  (ImportError, or the module's own SyntaxError, ...)
        raise ValueError(f"--model {spec!r}: cannot import module {mod_name!r}: {error_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable")
    model = obj() if not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: calling it returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _init_distributed() -> tuple[bool, torch.device]:
    """Join ``torchrun``'s group when launched by it; the device for this rank."""
    import torch.distributed as dist

    from ..distributed._comm import collective_timeout

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=collective_timeout())
        return True, device
    return False, device


def _check_device(name: str) -> None:
    """``--device`` names a device this process has, checked without creating a context on it (under
    ``torchrun`` every rank would otherwise open one on GPU 0 before choosing its own)."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name: {error_line(e)}") from None
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {name!r}: no {dev.type} device is available here")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ValueError(f"--device {name!r}: there are {count()} {dev.type} devices")


def _check_args(args: argparse.Namespace) -> list[str]:
    """Every argument of ``score`` that can be checked without the data or the model; returns the layers."""
    from ._score import check_options
    from ._subsets import check_classes, lookup

    from ..distributed._comm import collective_timeout

    collective_timeout()  # EDFKERN_DIST_TIMEOUT: a bad value is an input error, one line and exit 2
    layers = [s for s in args.layers.split(",") if s]
    if not layers:
        raise ValueError(f"--layers must name at least one module, e.g. layer1,layer2,layer3,layer4; got "
                         f"{args.layers!r}")
    check_options(method=args.method, threshold=args.threshold, strict=not args.non_strict,
                  num_samples=args.num_samples, std=args.std, seed=args.seed, checkpoint_every=args.checkpoint_every,
                  batch_size=args.batch_size)
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    if args.subset:
        check_classes(lookup(args.subset), what=f"--subset {args.subset}", dedupe=args.dedupe, how="add --dedupe")
    if args.device:
        _check_device(args.device)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    return layers


def _check_out(args: argparse.Namespace) -> None:
    """``--out`` exists (created) and takes the result files; the checkpoint, the maps and the free space
    are checked by :func:`edfkern.compdd.score` before it scores."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, expected a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the folder: {e.strerror or error_line(e)}") from None
    for name in ["complexity.json", "complexity.csv"] + (["complexity.png"] if args.plot else []):
        check_output(os.path.join(args.out, name), "--out")


def _score(args: argparse.Namespace) -> int:
    from ._dataset import subset
    from ._score import NonFiniteImagesWarning, score
    from ._storage import rank_path
    from ..distributed._comm import default_group, world

    layers = _check_args(args)
    data = load_data(args.data, args.image_size)
    if args.subset:
        data = subset(data, args.subset, dedupe=args.dedupe)
    model = load_model(args.model)
    _check_out(args)
    started, device = _init_distributed()
    try:
        if args.device:
            device = torch.device(args.device)
        model.to(device)
        rank, size = world(default_group())
        ck = os.path.join(args.out, "checkpoint.pt")
        resume = None
        if args.resume:
            if os.path.exists(rank_path(ck, rank, size)):
                resume = ck
            elif rank == 0:
                print(f"--resume: no checkpoint in {args.out}, starting from the beginning", file=sys.stderr)
        loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonFiniteImagesWarning)
            result = score(model, loader, layers=layers, method=args.method, threshold=args.threshold,
                           strict=not args.non_strict, num_samples=args.num_samples, std=args.std, seed=args.seed,
                           checkpoint=ck, checkpoint_every=args.checkpoint_every, resume=resume,
                           save_maps=os.path.join(args.out, "maps.npy") if args.save_maps else None,
                           progress=not args.no_progress,
                           tags={"image_size": args.image_size, "subset": args.subset, "dedupe": args.dedupe})
        for w in caught:
            if issubclass(w.category, NonFiniteImagesWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if rank == 0:
            result.to_json(os.path.join(args.out, "complexity.json"))
            result.to_csv(os.path.join(args.out, "complexity.csv"))
            if args.plot:
                result.plot(os.path.join(args.out, "complexity.png"))
            scored = int((result.counts > 0).sum())
            left = f", left out {len(result.nonfinite)} non-finite" if result.nonfinite else ""
            print(f"scored {int(result.counts.sum())} images over {scored} classes on {size} rank(s){left}; "
                  f"wrote {os.path.join(args.out, 'complexity.json')} and complexity.csv")
    finally:
        if started:
            from ..distributed import shutdown

            shutdown()
    return 0


def _subsets(args: argparse.Namespace) -> int:
    from ._subsets import SUBSETS

    for name, cls in SUBSETS.items():
        print(f"{name:12s} {', '.join(map(str, cls))}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage too): exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code: 0, or 2 with one ``error: ...`` line on stderr for bad input."""
    p = _Parser(prog="python -m edfkern.compdd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="per-class complexity of a labelled image set")
    s.add_argument("--data", required=True, help="image folder (needs torchvision), or .pt/.npz of images and labels")
    s.add_argument("--model", required=True, help="MODULE:CALLABLE returning the classifier (an nn.Module)")
    s.add_argument("--layers", required=True, help="comma-separated module names, e.g. layer1,layer2,layer3,layer4")
    s.add_argument("--out", required=True, help="output folder: complexity.json, complexity.csv, checkpoint.pt")
    s.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    s.add_argument("--method", default="smoothgradcam++", choices=["smoothgradcam++", "gradcam++", "gradcam"])
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--non-strict", action="store_true", help="count pixels >= threshold (default: >)")
    s.add_argument("--num-samples", type=int, default=4)
    s.add_argument("--std", type=float, default=0.3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--num-workers", type=int, default=0)
    s.add_argument("--image-size", type=int, default=224, help="folder data: resize to this square size")
    s.add_argument("--subset", default=None, help="score only this Comp-DD subset's classes (labels 0..9)")
    s.add_argument("--dedupe", action="store_true", help="with --subset music_hard: its 9 distinct classes")
    s.add_argument("--checkpoint-every", type=int, default=100, help="batches between checkpoints")
    s.add_argument("--save-maps", action="store_true", help="also write every map into OUT/maps.npy")
    s.add_argument("--plot", action="store_true", help="also write OUT/complexity.png (needs matplotlib)")
    s.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_score)
    sub.add_parser("subsets", help="print the 16 Comp-DD subsets").set_defaults(func=_subsets)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        return 2
