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

Trust at the edges: every check that can fail (arguments, labels and the number of classes, the
checkpoint and what it was computed from, the output paths and the free space) runs before the
first image is scored, and under ``torchrun`` the ranks agree on the outcome, so that one rank's
bad input stops every rank at once instead of leaving the others waiting in a collective.
Images (or their CAM maps) that are not finite are left out of the scores, listed in
:attr:`ComplexityResult.nonfinite` and reported with a :class:`NonFiniteImagesWarning`; when no
image is finite, :func:`score` raises ``ValueError``.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ..cam import CAMExtractor
from ..distributed._comm import all_reduce_sum_, default_group, gather_ints, world
from ..ops.gradcam import METHODS
from . import _storage as storage
from ._dataset import stored_labels
from ._fingerprint import dataset_fingerprint, model_fingerprint
from ._result import ComplexityResult
from ._storage import PathLike, load_maps

__all__ = ["score", "load_maps", "image_noise", "check_options", "NonFiniteImagesWarning", "MAX_CLASSES"]

#: ``noise(indices, images) -> (num_samples, B, C, H, W)`` standard-normal draws for a batch.
NoiseFn = Callable[[Tensor, Tensor], Tensor]
#: Most classes a run may have. The running sums take ``K x layers`` float64 values per rank and the
#: result one row per class; ImageNet-21k has 21,841 classes, so a larger ``K`` is a label error
#: (one label of 10**9 would otherwise allocate 24 GB for three layers before anything is checked).
MAX_CLASSES = 1 << 16
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


class NonFiniteImagesWarning(RuntimeWarning):
    """Some images (or their CAM maps) held NaN or inf and were left out of the scores."""


def check_options(*, method: str = "smoothgradcam++", threshold: float = 0.5, strict: bool = True,
                  num_samples: int = 4, std: float = 0.3, seed: int = 0, checkpoint_every: int = 100,
                  batch_size: Optional[int] = None, cam_batch_size: Optional[int] = None,
                  fingerprint_images: int = 16) -> float:
    """Check :func:`score`'s scalar options (the CLI calls it before loading anything); returns the threshold."""
    threshold = _check_number("threshold", threshold, 0.0, 1.0)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    for name, v, lo in (("seed", seed, 0), ("checkpoint_every", checkpoint_every, 1),
                        ("fingerprint_images", fingerprint_images, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    # method, num_samples, std and cam_batch_size: the extractor's own checks (it hooks nothing until called)
    CAMExtractor(nn.Identity(), "", method=method, num_samples=num_samples, std=std, batch_size=cam_batch_size)
    return threshold


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


def _check_tags(tags: Optional[dict]) -> None:
    """Tags travel in the checkpoint, which is read back with ``weights_only=True``: plain values only."""
    if tags is None:
        return
    if not isinstance(tags, dict) or not all(isinstance(k, str) for k in tags):
        raise TypeError(f"tags must be None or a dict with str keys, got {tags!r}")
    plain = (str, int, float, bool, type(None))
    for key, v in tags.items():
        if not (isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(e, plain) for e in v))):
            raise TypeError(f"tags[{key!r}] must be a str, number, bool, None or a list of those, got "
                            f"{type(v).__name__}")


def _check_number(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _agree(error: Optional[BaseException], *, group: Optional[object], device: torch.device, what: str) -> None:
    """Raise on every rank when any rank failed a local check: its own error on the failing rank(s),
    a ``ValueError`` naming them on the others. One small collective; none for one process."""
    flags = gather_ints([0 if error is None else 1], group=group, device=device, what=f"compdd {what}")
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(flags) if row[0]]
    if failed:
        raise ValueError(f"compdd {what}: rank(s) {failed} refused the run (their error is on their stderr)")


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


def _num_classes(ds: Any, labels: Optional[Tensor], logits_width: int) -> int:
    """``K``: the dataset's class names, else its largest label + 1, else the model's logit width.

    Checked before anything of size ``K`` is allocated: ``K <= MAX_CLASSES``, and (when the labels
    are known without loading images) every label in ``[0, K)``.
    """
    names = getattr(ds, "classes", None)
    lo = hi = None
    if labels is not None and labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            i = int((labels < 0).nonzero()[0])
            raise ValueError(f"labels must be class indices >= 0, got {lo} (first negative label at dataset index {i})")
    if isinstance(names, (list, tuple)) and names:
        k, source = len(names), f"the dataset's {len(names)} class names"
    elif hi is not None:
        k, source = hi + 1, f"the largest label, {hi}, + 1"
    else:
        k, source = logits_width, f"the model's {logits_width} outputs (the dataset has no .targets)"
    if k > MAX_CLASSES:
        where = ""
        if labels is not None and hi is not None and hi >= MAX_CLASSES:
            where = f" (first label >= {MAX_CLASSES} at dataset index {int((labels >= MAX_CLASSES).nonzero()[0])})"
        raise ValueError(f"{k} classes from {source}: at most {MAX_CLASSES} are supported{where}; are the labels "
                         "class indices?")
    if hi is not None and hi >= k:
        i = int((labels >= k).nonzero()[0])
        raise ValueError(f"labels must lie in [0, {k}) ({source}), got {hi} (first at dataset index {i})")
    return k


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
    except RuntimeError as e:  # e.g. 1-channel images into a 3-channel model: the data does not fit the model
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the model cannot take the dataset's images ({tuple(image.shape)}, {image.dtype}): "
                         f"{msg}") from None
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


def _finite_rows(*tensors: Tensor) -> Tensor:
    """``(B,)`` bool: row ``b`` of every tensor ``(B, ...)`` is finite."""
    ok = torch.isfinite(tensors[0].flatten(1)).all(1)
    for t in tensors[1:]:
        ok &= torch.isfinite(t.flatten(1)).all(1)
    return ok


def _nonfinite_message(bad: list[int], n: int) -> str:
    shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
    return (f"{len(bad)} of {n} images are not finite (NaN or inf in the image or in its CAM maps) and were left "
            f"out of the scores: dataset indices [{shown}] (all of them in the result's nonfinite, "
            f"and in complexity.json from the CLI)")


# ----------------------------------------------------------------------------- the scorer


def score(model: nn.Module, loader: Union[DataLoader, Dataset], *, layers: Sequence[Union[str, nn.Module]],
          method: str = "smoothgradcam++", threshold: float = 0.5, strict: bool = True, num_samples: int = 4,
          std: float = 0.3, seed: int = 0, noise: Optional[NoiseFn] = None, batch_size: Optional[int] = None,
          cam_batch_size: Optional[int] = None, checkpoint: Optional[PathLike] = None, checkpoint_every: int = 100,
          resume: Optional[PathLike] = None, save_maps: Optional[PathLike] = None, progress: bool = True,
          group: Optional[object] = None, tags: Optional[dict] = None,
          fingerprint_images: int = 16) -> ComplexityResult:
    """Class complexity of a labelled image set, the measure Comp-DD ranks classes by.

    Args:
        model: a classifier returning logits ``(B, K)``; its device (of its first parameter) is where
            the images and the running sums go. It is run in eval mode and left as found.
        loader: a ``DataLoader`` over a map-style dataset yielding ``(images (B, C, H, W), labels (B,))``,
            or the dataset itself. Its dataset, batch size, workers, collate function and pin_memory are
            used; its sampler is replaced by the dataset order (sharded under ``torchrun``), because the
            scorer tracks each image's index (for the noise, resuming and ``save_maps``). ``K`` is the
            number of its ``.classes``, else its largest label + 1 (read from ``.targets``), else the
            model's logit width; at most :data:`MAX_CLASSES`, checked before anything is allocated.
        layers: the modules scored (names in ``model.named_modules()`` or the modules), e.g.
            ``["layer1", "layer2", "layer3", "layer4"]`` for a ResNet. All share one set of CAM passes.
        method: ``"smoothgradcam++"`` (the authors', torchcam 0.4 ``SmoothGradCAMpp``), ``"gradcam++"``
            or ``"gradcam"``. The CAM class is each image's predicted (argmax) class, as the authors did.
        threshold: a map pixel counts as "discriminative" when ``> threshold`` (``>=`` if not ``strict``).
        strict: ``True`` (default) counts ``> threshold`` as the released code did (which produced the
            published lists); ``False`` counts ``>=`` as the README's formula says.
        num_samples, std: noisy passes and noise standard deviation (torchcam: 4, 0.3).
        seed: seeds the per-image noise (see the module docstring).
        noise: instead of the seeded per-image noise, ``noise(indices, images) -> (num_samples, B, C, H, W)``
            standard-normal draws for a batch (scaled by ``std``).
        batch_size: images per batch (overrides the loader's; default 64 for a dataset).
        cam_batch_size: most rows per CAM forward pass (``CAMExtractor``'s ``batch_size``).
        checkpoint: write the running sums and the position there every ``checkpoint_every`` batches
            and at the end (atomically). Under ``torchrun`` each rank writes ``<root>.rank<r>-of-<W><ext>``.
            Its folder is checked writable, with room for it, before scoring starts.
        resume: continue from this checkpoint (per-rank names as above). It must come from the same
            model weights, layers, method, threshold, strict, num_samples, std, seed, world size, tags
            and dataset (size, label histogram and order, and a hash of ``fingerprint_images`` sampled
            images), else ``ValueError`` says what differs. Checkpoints then go to ``checkpoint``,
            or to ``resume`` when ``checkpoint`` is ``None``.
        save_maps: also write every map into one ``.npy`` memory-mapped float32 array ``(n, P)``, ``P``
            the summed ``h*w`` of the layers, row ``i`` = dataset image ``i``, with a ``<path>.json``
            layout; read it back with :func:`load_maps`. Its bytes are reserved before scoring starts.
        progress: a tqdm bar with images/second on rank 0 (only when stderr is a terminal).
        group: the process group; ``None`` uses the default group under ``torchrun`` (else one process).
        tags: further settings that change the scores and that the caller wants checked on resume
            (the CLI records ``image_size``, ``subset`` and ``dedupe``): recorded in the checkpoint and
            the result's ``config``, compared like the options above.
        fingerprint_images: images hashed into the dataset's fingerprint (``0``: none, e.g. for a
            dataset with random transforms, whose images differ on every read).

    Returns:
        A :class:`ComplexityResult` (identical on every rank). Images that hold NaN or inf, or whose
        CAM maps do, are left out of the sums and counts and listed in its ``nonfinite``; a
        :class:`NonFiniteImagesWarning` (on rank 0) gives their number and first indices.

    Raises:
        ValueError: bad options, labels or ``K``; a checkpoint of another configuration or dataset,
            or an unreadable one; an output path that cannot be written or a disk without room; a
            model that cannot take the images; no finite image at all. Under ``torchrun`` a rank
            whose own checks fail makes every rank raise before the first image is scored.

    Under ``torchrun`` every rank calls ``score`` the same way: each takes its ``DistributedSampler``
    shard (the padded duplicates that make shards equal are skipped, not scored twice), and the
    per-class sums and counts are all-reduced once at the end.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    threshold = check_options(method=method, threshold=threshold, strict=strict, num_samples=num_samples, std=std,
                              seed=seed, checkpoint_every=checkpoint_every, batch_size=batch_size,
                              cam_batch_size=cam_batch_size, fingerprint_images=fingerprint_images)
    names = _layer_names(model, layers)
    if noise is not None and not callable(noise):
        raise TypeError("noise must be None or a callable (indices, images) -> (num_samples, B, C, H, W)")
    _check_tags(tags)
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
    collate = loader_kw["collate_fn"]

    def read(i: int) -> tuple[Tensor, int]:
        images, labels = _split_batch(collate([ds[i]]))
        return images[0], int(labels[0])

    # Every check this rank can fail on its own, before anything is allocated, written or scored.
    error: Optional[BaseException] = None
    try:
        labels = stored_labels(ds)
        width, shapes = _probe(model, names, read(0)[0].to(device=device, dtype=dtype))
        k = _num_classes(ds, labels, width)
        config = {"model": model_fingerprint(model), "layers": names, "method": method, "threshold": threshold,
                  "strict": strict, "num_samples": num_samples if method == "smoothgradcam++" else 0,
                  "std": float(std) if method == "smoothgradcam++" else 0.0,
                  "noise": f"seed={seed}" if noise is None else
                  f"custom:{getattr(noise, '__qualname__', type(noise).__name__)}",
                  "num_classes": k, "world_size": size, "rank": rank,
                  **dataset_fingerprint(n, labels, k, read, fingerprint_images)}
        clash = sorted(set(tags or {}) & set(config))
        if clash:
            raise ValueError(f"tags must not reuse the scorer's own configuration names, got {clash}")
        config.update(tags or {})
        # This rank's images: its DistributedSampler shard without the padding (positions >= n).
        if size > 1:
            shard = list(DistributedSampler(ds, num_replicas=size, rank=rank, shuffle=False, drop_last=False))
            mine = [i for j, i in enumerate(shard) if rank + j * size < n]
        else:
            mine = list(range(n))
        ck = None
        if resume is not None:
            ck = storage.load_checkpoint(storage.rank_path(resume, rank, size), config, num_classes=k,
                                         num_layers=len(names), todo=len(mine), n=n)
            if checkpoint is None:
                checkpoint = resume
        ck_path = None if checkpoint is None else storage.rank_path(checkpoint, rank, size)
        layout = storage.maps_layout(names, shapes)
        writes = []  # (path, bytes it needs, what)
        if ck_path is not None:
            storage.check_output(ck_path, "checkpoint")
            writes.append((ck_path, storage.checkpoint_bytes(k, len(names), n), "checkpoint"))
        if save_maps is not None:
            storage.check_output(save_maps, "save_maps")
            storage.check_output(f"{os.fspath(save_maps)}.json", "save_maps layout")
            if resume is None and rank == 0:
                writes.append((os.fspath(save_maps), storage.maps_bytes(n, layout), "save_maps"))
        storage.check_writes(writes)
    except Exception as e:  # noqa: BLE001  (whatever it is, the other ranks must not wait for this one)
        error = e
    _agree(error, group=group, device=device, what="setup")

    maps_file = None
    if save_maps is not None:
        error = None
        if rank == 0:
            try:
                if resume is None:
                    storage.create_maps(save_maps, n, layout)
                else:
                    storage.open_maps(save_maps, n, layout, reserve=True)  # whole, and its bytes reserved
            except Exception as e:  # noqa: BLE001
                error = e
        _agree(error, group=group, device=device, what="save_maps")  # also the barrier: the file exists first
        maps_file = storage.open_maps(save_maps, n, layout)
    offsets = layout["offsets"]

    sums = torch.zeros(k, len(names), dtype=acc, device=device)
    counts = torch.zeros(k, dtype=torch.long, device=device)
    nonfinite: list[int] = []
    start = 0
    if ck is not None:
        sums.copy_(ck["sums"])
        counts.copy_(ck["counts"])
        nonfinite = ck["nonfinite"].tolist()
        start = int(ck["done"])
    extractor = CAMExtractor(model, names, method=method, num_samples=num_samples, std=std, batch_size=cam_batch_size)

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
            done += len(idx)
            x = images.to(device=device, dtype=dtype, non_blocking=True)
            lab = labels.to(device, non_blocking=True)
            keep = _finite_rows(x)  # non-finite images are not scored at all
            if not bool(keep.all()):
                nonfinite += idx[~keep.cpu()].tolist()
                idx, x, lab = idx[keep.cpu()], x[keep], lab[keep]
            if len(idx):
                z = None
                if method == "smoothgradcam++":
                    z = image_noise(idx, x.shape[1:], num_samples, seed=seed, device=device, dtype=dtype) \
                        if noise is None else noise(idx, x)
                maps = extractor(x, "predicted", noise=z)
                keep = _finite_rows(*maps)  # finite images whose maps are not (the model overflowed)
                if not bool(keep.all()):
                    nonfinite += idx[~keep.cpu()].tolist()
                    idx, lab, maps = idx[keep.cpu()], lab[keep], [m[keep] for m in maps]
                counts.index_add_(0, lab, torch.ones_like(lab))
                for j, m in enumerate(maps):
                    above = (m > threshold) if strict else (m >= threshold)
                    frac = above.flatten(1).sum(1).to(acc) / (m.shape[-2] * m.shape[-1])
                    sums[:, j].index_add_(0, lab, 1.0 - frac)
                    if maps_file is not None and len(idx):
                        if tuple(m.shape[-2:]) != shapes[j]:
                            raise ValueError(f"save_maps needs every image to give layer {names[j]!r} maps of "
                                             f"shape {shapes[j]}, got {tuple(m.shape[-2:])}")
                        rows = idx.numpy()
                        maps_file[rows, offsets[j]:offsets[j] + m[0].numel()] = m.flatten(1).float().cpu().numpy()
            if bar is not None:
                bar.update(len(batch[0]))
            if ck_path is not None and (b + 1) % checkpoint_every == 0:
                if maps_file is not None:
                    maps_file.flush()
                storage.save_checkpoint(ck_path, config, done, sums, counts, nonfinite)
    finally:
        if bar is not None:
            bar.close()
        extractor.close()
    if maps_file is not None:
        maps_file.flush()
    if ck_path is not None:
        storage.save_checkpoint(ck_path, config, done, sums, counts, nonfinite)

    # One collective: the per-class sums and counts (counts are exact in float64 below 2**53).
    merged = torch.cat([sums, counts[:, None].to(acc)], dim=1)
    all_reduce_sum_([merged], group=group, what="compdd score sums")
    sums, counts = merged[:, :-1].cpu().double(), merged[:, -1].cpu().round().long()
    nonfinite = _gather_indices(nonfinite, group=group, device=device)
    if int(counts.sum()) == 0:
        raise ValueError(f"no image could be scored: all {n} images are not finite (NaN or inf in the image or "
                         f"in its CAM maps)")
    if nonfinite and rank == 0:
        warnings.warn(_nonfinite_message(nonfinite, n), NonFiniteImagesWarning, stacklevel=2)
    complexity = sums / counts[:, None].clamp_min(1)
    complexity[counts == 0] = math.nan
    public = {k_: v for k_, v in config.items() if k_ not in ("rank", "label_counts")}
    return ComplexityResult(layers=names, complexity=complexity, counts=counts, config=public,
                            class_names=_class_names(ds, k), nonfinite=nonfinite)


def _gather_indices(mine: list[int], *, group: Optional[object], device: torch.device) -> list[int]:
    """Every rank's list of dataset indices, merged and sorted: the lengths first, then one padded table
    (both small collectives; the second only when some rank has any)."""
    lengths = [row[0] for row in gather_ints([len(mine)], group=group, device=device, what="compdd nonfinite count")]
    if max(lengths) == 0:
        return []
    rank, size = world(group)
    table = torch.zeros(size, max(lengths), dtype=torch.long, device=device)
    table[rank, :len(mine)] = torch.tensor(mine, dtype=torch.long) + 1  # 0 = padding
    all_reduce_sum_([table], group=group, what="compdd nonfinite indices")
    return sorted(int(i) - 1 for i in table.flatten().tolist() if i)


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="img", desc="compdd score", smoothing=0.1)
