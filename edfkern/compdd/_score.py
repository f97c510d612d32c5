"""Streaming, resumable, distributed class-complexity scoring (how Comp-DD's subsets were chosen).

Per image: Smooth Grad-CAM++ maps (torchcam 0.4 semantics, normalised per map) for the
predicted (argmax) class at every scored layer, from one shared set of noisy passes
(:class:`edfkern.cam.CAMExtractor` with several layers); the image's complexity at a layer is
``1 - fraction of map pixels > threshold`` (``>=`` with ``strict=False``) at that layer's own
resolution. Per class, running sums and counts stay on the model's device; nothing is written
per image. The authors' pipeline instead rebuilt a torchcam extractor per batch and layer,
reran the noisy passes per layer, and saved one ``.npy`` per image per layer.

Noise (how to reproduce a score): by default image ``i`` of the dataset gets its own draws,
``torch.randn((num_samples, C, H, W))`` from a generator seeded from ``(seed, i)``. So the score
does not depend on the batch size, the number of ranks, or where a run was resumed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ..cam import CAMExtractor
from ..distributed._comm import all_reduce_sum_, default_group, world
from ..ops.gradcam import METHODS
from ._result import ComplexityResult

__all__ = ["score", "load_maps", "image_noise"]

PathLike = Union[str, "os.PathLike[str]"]
#: ``noise(indices, images) -> (num_samples, B, C, H, W)`` standard-normal draws for a batch.
NoiseFn = Callable[[Tensor, Tensor], Tensor]
_CKPT_VERSION = 1
_MASK63 = (1 << 63) - 1


# ----------------------------------------------------------------------------- noise


def _image_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image ``index`` (splitmix64 of ``seed`` and ``index``)."""
    m = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) & _MASK63


def image_noise(indices: Tensor, shape: Sequence[int], num_samples: int, *, seed: int,
                device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The default noise: ``(num_samples, B, *shape)`` standard-normal draws, image ``indices[b]``'s from
    a generator seeded by ``(seed, indices[b])``, independent of batching and sharding."""
    out = torch.empty((num_samples, len(indices)) + tuple(shape), device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    for b, i in enumerate(indices.tolist()):
        gen.manual_seed(_image_seed(seed, int(i)))
        out[:, b] = torch.randn((num_samples,) + tuple(shape), generator=gen, device=device, dtype=dtype)
    return out


# ----------------------------------------------------------------------------- argument checks


def _layer_names(model: nn.Module, layers: Sequence[Union[str, nn.Module]]) -> list[str]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a non-empty list of module names or modules of the model, got {layers!r}")
    names_of = {id(m): n for n, m in model.named_modules()}
    names = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError:
                some = [n for n, _ in model.named_modules() if n and "." not in n][:20]
                raise ValueError(f"layers: {layer!r} is not a module of the model; its top-level modules are "
                                 f"{some}") from None
            names.append(layer)
        elif isinstance(layer, nn.Module):
            if id(layer) not in names_of:
                raise ValueError(f"layers: the {type(layer).__name__} given is not a module of the model")
            names.append(names_of[id(layer)])
        else:
            raise TypeError(f"layers must hold module names or modules, got {type(layer).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a module more than once: {names}")
    return names


def _check_number(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- data


class _Indexed(Dataset):
    """``(index, item)`` for each item of ``base``, so the scorer knows every image's dataset index."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return i, self.base[i]


class _IndexedCollate:
    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, batch):
        return torch.tensor([i for i, _ in batch], dtype=torch.long), self.collate([item for _, item in batch])


def _loader_parts(loader: Union[DataLoader, Dataset], batch_size: Optional[int]) -> tuple[Dataset, dict]:
    from torch.utils.data import default_collate

    if isinstance(loader, DataLoader):
        ds = loader.dataset
        bs = loader.batch_size if loader.batch_size is not None else getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is not None:
            bs = batch_size
        if bs is None:
            raise ValueError("loader has no batch_size (a custom batch_sampler); pass batch_size=")
        kw = dict(batch_size=bs, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory)
        if loader.num_workers > 0:
            kw.update(persistent_workers=False, prefetch_factor=loader.prefetch_factor)
    else:
        ds = loader
        kw = dict(batch_size=batch_size or 64, num_workers=0, collate_fn=default_collate, pin_memory=False)
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise TypeError("loader must be a DataLoader over a map-style dataset (or such a dataset): the scorer "
                        f"shards, resumes and seeds by image index; got {type(ds).__name__}")
    if isinstance(kw["batch_size"], bool) or not isinstance(kw["batch_size"], int) or kw["batch_size"] < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {kw['batch_size']!r}")
    return ds, kw


def _num_classes(ds: Any, logits_width: int) -> int:
    names = getattr(ds, "classes", None)
    if isinstance(names, (list, tuple)) and names:
        return len(names)
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets):
        return int(torch.as_tensor(targets).max()) + 1
    return logits_width


def _class_names(ds: Any, k: int) -> Optional[list]:
    names = getattr(ds, "classes", None)
    if isinstance(names, (list, tuple)) and len(names) == k:
        return [n if isinstance(n, (int, str)) else str(n) for n in names]
    return None


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(f"the loader must yield (images, labels, ...) batches, got {type(batch).__name__}")
    images, labels = batch[0], batch[1]
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError("the loader must yield images as a (B, C, H, W) tensor, got "
                        f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise TypeError(f"the loader must yield integer labels (B,), got {labels.dtype} {tuple(labels.shape)}")
    return images, labels.to(torch.long)


def _probe(model: nn.Module, names: list[str], image: Tensor) -> tuple[int, list[tuple[int, int]]]:
    """The model's logit width and each layer's output ``(h, w)``, from one clean forward of one image."""
    shapes: dict[int, tuple[int, int]] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, j=j: shapes.__setitem__(j, tuple(o.shape[-2:]))) for j, n in enumerate(names)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = model(image[None])
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    missing = [names[j] for j in range(len(names)) if j not in shapes]
    if missing:
        raise ValueError(f"layers {missing} are not called by the model's forward")
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise TypeError("the model must return logits (B, K)")
    return int(out.shape[1]), [shapes[j] for j in range(len(names))]


# ----------------------------------------------------------------------------- maps file


def _maps_layout(names: list[str], shapes: list[tuple[int, int]]) -> dict:
    offsets, off = [], 0
    for h, w in shapes:
        offsets.append(off)
        off += h * w
    return {"layers": names, "shapes": [list(s) for s in shapes], "offsets": offsets, "pixels": off}


def load_maps(path: PathLike) -> dict[str, Any]:
    """The maps :func:`score` saved with ``save_maps=path``: ``{layer: (n, h, w) read-only memmap}``.

    Row ``i`` is dataset image ``i``; rows of images not yet scored (a partial run) are NaN.
    """
    import numpy as np

    with open(f"{path}.json") as f:
        layout = json.load(f)
    arr = np.load(path, mmap_mode="r")
    return {name: arr[:, off:off + h * w].reshape(arr.shape[0], h, w)
            for name, (h, w), off in zip(layout["layers"], layout["shapes"], layout["offsets"])}


def _open_maps(path: PathLike, n: int, layout: dict, create: bool, group: Optional[object], rank: int,
               device: torch.device):
    from numpy.lib.format import open_memmap

    if not create and not os.path.exists(path):
        raise FileNotFoundError(f"save_maps: resuming writes into the interrupted run's maps file, but {path} "
                                "does not exist")
    if create and rank == 0:
        arr = open_memmap(path, mode="w+", dtype="float32", shape=(n, layout["pixels"]))
        arr[:] = float("nan")
        arr.flush()
        del arr
        with open(f"{path}.json", "w") as f:
            json.dump(layout, f)
    # A barrier (the file exists before any rank opens it), on the device so NCCL can carry it.
    all_reduce_sum_([torch.zeros(1, device=device)], group=group, what="compdd save_maps barrier")
    arr = open_memmap(path, mode="r+")
    if arr.shape != (n, layout["pixels"]):
        raise ValueError(f"save_maps file {path} holds shape {arr.shape}, expected {(n, layout['pixels'])}")
    return arr


# ----------------------------------------------------------------------------- checkpoints


def _rank_path(path: PathLike, rank: int, size: int) -> str:
    path = os.fspath(path)
    if size == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}-of-{size}{ext}"


def _save_checkpoint(path: str, config: dict, done: int, sums: Tensor, counts: Tensor) -> None:
    tmp = f"{path}.tmp"
    torch.save({"version": _CKPT_VERSION, "config": config, "done": done, "sums": sums.cpu(),
                "counts": counts.cpu()}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint


def _load_checkpoint(path: str, config: dict) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("version") != _CKPT_VERSION or "config" not in ck:
        raise ValueError(f"resume: {path} is not an edfkern.compdd checkpoint (version {_CKPT_VERSION})")
    diff = [f"{k}: checkpoint {ck['config'].get(k)!r}, this call {v!r}" for k, v in config.items()
            if ck["config"].get(k) != v]
    if diff:
        raise ValueError(f"resume: checkpoint {path} was written by another configuration; " + "; ".join(diff))
    return ck


# ----------------------------------------------------------------------------- the scorer


def score(model: nn.Module, loader: Union[DataLoader, Dataset], *, layers: Sequence[Union[str, nn.Module]],
          method: str = "smoothgradcam++", threshold: float = 0.5, strict: bool = True, num_samples: int = 4,
          std: float = 0.3, seed: int = 0, noise: Optional[NoiseFn] = None, batch_size: Optional[int] = None,
          cam_batch_size: Optional[int] = None, checkpoint: Optional[PathLike] = None, checkpoint_every: int = 100,
          resume: Optional[PathLike] = None, save_maps: Optional[PathLike] = None, progress: bool = True,
          group: Optional[object] = None) -> ComplexityResult:
    """Class complexity of a labelled image set, the measure Comp-DD ranks classes by.

    Args:
        model: a classifier returning logits ``(B, K)``; its device (of its first parameter) is where
            the images and the running sums go. It is run in eval mode and left as found.
        loader: a ``DataLoader`` over a map-style dataset yielding ``(images (B, C, H, W), labels (B,))``,
            or the dataset itself. Its dataset, batch size, workers, collate function and pin_memory are
            used; its sampler is replaced by the dataset order (sharded under ``torchrun``), because the
            scorer tracks each image's index (for the noise, resuming and ``save_maps``).
        layers: the modules scored (names in ``model.named_modules()`` or the modules), e.g.
            ``["layer1", "layer2", "layer3", "layer4"]`` for a ResNet. All share one set of CAM passes.
        method: ``"smoothgradcam++"`` (the authors', torchcam 0.4 ``SmoothGradCAMpp``), ``"gradcam++"``
            or ``"gradcam"``. The CAM class is each image's predicted (argmax) class, as the authors did.
        threshold: a map pixel counts as "discriminative" when ``> threshold`` (``>=`` if not ``strict``).
        strict: ``True`` (default) counts ``> threshold`` as the released code did (which produced the
            published lists); ``False`` counts ``>=`` as the README's formula says.
        num_samples, std: noisy passes and noise standard deviation (torchcam: 4, 0.3).
        seed: seeds the per-image noise (see the module docstring).
        noise: instead of the seeded per-image noise, ``noise(indices, images)`` returns the
            ``(num_samples, B, C, H, W)`` standard-normal draws for a batch (scaled by ``std``).
        batch_size: images per batch (overrides the loader's; default 64 for a dataset).
        cam_batch_size: most rows per CAM forward pass (``CAMExtractor``'s ``batch_size``).
        checkpoint: write the running sums and the position there every ``checkpoint_every`` batches
            and at the end (atomically). Under ``torchrun`` each rank writes ``<root>.rank<r>-of-<W><ext>``.
        resume: continue from this checkpoint (per-rank names as above); it must come from the same
            model weights, layers, method, threshold, strict, num_samples, std, seed, dataset size and
            world size, else ``ValueError`` says what differs. Checkpoints then go to ``checkpoint``,
            or to ``resume`` when ``checkpoint`` is ``None``.
        save_maps: also write every map into one ``.npy`` memory-mapped float32 array ``(n, P)``, ``P``
            the summed ``h*w`` of the layers, row ``i`` = dataset image ``i``, with a ``<path>.json``
            layout; read it back with :func:`load_maps`.
        progress: a tqdm bar with images/second on rank 0 (only when stderr is a terminal).
        group: the process group; ``None`` uses the default group under ``torchrun`` (else one process).

    Returns:
        A :class:`ComplexityResult` (identical on every rank).

    Under ``torchrun`` every rank calls ``score`` the same way: each takes its ``DistributedSampler``
    shard (the padded duplicates that make shards equal are skipped, not scored twice), and the
    per-class sums and counts are all-reduced once at the end.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _layer_names(model, layers)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    threshold = _check_number("threshold", threshold, 0.0, 1.0)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if noise is not None and not callable(noise):
        raise TypeError("noise must be None or a callable (indices, images) -> (num_samples, B, C, H, W)")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    extractor = CAMExtractor(model, names, method=method, num_samples=num_samples, std=std, batch_size=cam_batch_size)
    ds, loader_kw = _loader_parts(loader, batch_size)
    n = len(ds)
    if n == 0:
        raise ValueError("the dataset is empty")

    group = group if group is not None else default_group()
    rank, size = world(group)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    acc = torch.float32 if device.type == "mps" else torch.float64

    first = _split_batch(loader_kw["collate_fn"]([ds[0]]))[0][0].to(device=device, dtype=dtype)
    width, shapes = _probe(model, names, first)
    k = _num_classes(ds, width)
    config = {"model": _model_fingerprint(model), "layers": names, "method": method, "threshold": threshold,
              "strict": strict, "num_samples": num_samples if method == "smoothgradcam++" else 0,
              "std": float(std) if method == "smoothgradcam++" else 0.0,
              "noise": f"seed={seed}" if noise is None else f"custom:{getattr(noise, '__qualname__', type(noise).__name__)}",
              "dataset_size": n, "num_classes": k, "world_size": size, "rank": rank}

    # This rank's images: its DistributedSampler shard without the padding (positions >= n).
    if size > 1:
        shard = list(DistributedSampler(ds, num_replicas=size, rank=rank, shuffle=False, drop_last=False))
        mine = [i for j, i in enumerate(shard) if rank + j * size < n]
    else:
        mine = list(range(n))

    sums = torch.zeros(k, len(names), dtype=acc, device=device)
    counts = torch.zeros(k, dtype=torch.long, device=device)
    start = 0
    if resume is not None:
        ck = _load_checkpoint(_rank_path(resume, rank, size), config)
        sums.copy_(ck["sums"])
        counts.copy_(ck["counts"])
        start = int(ck["done"])
        if checkpoint is None:
            checkpoint = resume
    ck_path = None if checkpoint is None else _rank_path(checkpoint, rank, size)
    maps_file = None
    if save_maps is not None:
        maps_file = _open_maps(save_maps, n, _maps_layout(names, shapes), create=resume is None, group=group,
                               rank=rank, device=device)
    offsets = _maps_layout(names, shapes)["offsets"]

    todo = mine[start:]
    data = DataLoader(_Indexed(ds), sampler=todo, batch_size=loader_kw.pop("batch_size"),
                      collate_fn=_IndexedCollate(loader_kw.pop("collate_fn")), **loader_kw)
    bar = _progress_bar(progress and rank == 0, total=len(mine), initial=start)
    done = start
    try:
        for b, (idx, batch) in enumerate(data):
            images, labels = _split_batch(batch)
            if int(labels.min()) < 0 or int(labels.max()) >= k:
                raise ValueError(f"labels must lie in [0, {k}) ({k} classes), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            x = images.to(device=device, dtype=dtype, non_blocking=True)
            z = None
            if method == "smoothgradcam++":
                z = image_noise(idx, x.shape[1:], num_samples, seed=seed, device=device, dtype=dtype) \
                    if noise is None else noise(idx, x)
            maps = extractor(x, "predicted", noise=z)
            lab = labels.to(device, non_blocking=True)
            counts.index_add_(0, lab, torch.ones_like(lab))
            for j, m in enumerate(maps):
                above = (m > threshold) if strict else (m >= threshold)
                frac = above.flatten(1).sum(1).to(acc) / (m.shape[-2] * m.shape[-1])
                sums[:, j].index_add_(0, lab, 1.0 - frac)
                if maps_file is not None:
                    if tuple(m.shape[-2:]) != shapes[j]:
                        raise ValueError(f"save_maps needs every image to give layer {names[j]!r} maps of shape "
                                         f"{shapes[j]}, got {tuple(m.shape[-2:])}")
                    rows = idx.numpy()
                    maps_file[rows, offsets[j]:offsets[j] + m[0].numel()] = m.flatten(1).float().cpu().numpy()
            done += len(idx)
            if bar is not None:
                bar.update(len(idx))
            if ck_path is not None and (b + 1) % checkpoint_every == 0:
                if maps_file is not None:
                    maps_file.flush()
                _save_checkpoint(ck_path, config, done, sums, counts)
    finally:
        if bar is not None:
            bar.close()
        extractor.close()
    if maps_file is not None:
        maps_file.flush()
    if ck_path is not None:
        _save_checkpoint(ck_path, config, done, sums, counts)

    # One collective: the per-class sums and counts (counts are exact in float64 below 2**53).
    merged = torch.cat([sums, counts[:, None].to(acc)], dim=1)
    all_reduce_sum_([merged], group=group, what="compdd score sums")
    sums, counts = merged[:, :-1].cpu().double(), merged[:, -1].cpu().round().long()
    complexity = sums / counts[:, None].clamp_min(1)
    complexity[counts == 0] = math.nan
    public = {k_: v for k_, v in config.items() if k_ != "rank"}
    return ComplexityResult(layers=names, complexity=complexity, counts=counts, config=public,
                            class_names=_class_names(ds, k))


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="img", desc="compdd score", smoothing=0.1)
