"""What ties a Comp-DD checkpoint to the model and the dataset it was computed from.

A resumed run adds its sums to the checkpoint's, so a checkpoint of another dataset of the same
size would silently mix two datasets' numbers. The checkpoint therefore records:

* ``model``: a hash of the model's class and every state-dict tensor (names, shapes, dtypes, bytes);
* ``dataset_size``;
* ``label_counts`` (the label histogram) and ``labels_sha256`` (a hash of every label, in order),
  when the dataset's labels can be read without loading images (``.targets``, as torchvision's
  datasets, :class:`~edfkern.compdd.CompSubset` and the CLI's tensor files have); ``None`` otherwise;
* ``image_shape`` and ``images_sha256``: the shape of image 0 and a hash of ``samples`` images
  spread evenly over the dataset (first and last included), with their indices, labels, dtypes,
  shapes and bytes, read the way the scorer reads them.

What is not sampled is not compared: a dataset that differs only in an image that is not among
the sampled ones passes (with ``samples >= n`` every image is hashed).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["model_fingerprint", "dataset_fingerprint", "sample_indices"]


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of a SHA-256 of the model's class name and state dict."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def sample_indices(n: int, samples: int) -> list[int]:
    """``min(samples, n)`` indices spread evenly over ``[0, n)``, ``0`` and ``n - 1`` among them."""
    m = min(samples, n)
    if m <= 0:
        return []
    if m == 1:
        return [0]
    return sorted({j * (n - 1) // (m - 1) for j in range(m)})


def dataset_fingerprint(n: int, labels: Optional[Tensor], num_classes: int, read: Callable[[int], tuple[Tensor, int]],
                        samples: int) -> dict:
    """The dataset entries of a checkpoint's configuration (see the module docstring).

    Args:
        n: the dataset's size.
        labels: ``(n,)`` int64 labels in ``[0, num_classes)``, or ``None`` when reading them would load images.
        num_classes: ``K``, the histogram's length.
        read: ``read(i) -> (image (C, H, W), label)``, as the scorer reads item ``i``.
        samples: how many images to hash; ``0`` records no image hash (``images_sha256`` is ``None``).
    """
    fp: dict = {"dataset_size": n, "label_counts": None, "labels_sha256": None}
    if labels is not None:
        fp["label_counts"] = torch.bincount(labels, minlength=num_classes).tolist()
        fp["labels_sha256"] = hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    first = read(0)
    fp["image_shape"] = list(first[0].shape)
    if samples <= 0:
        fp["images_sha256"] = None
        return fp
    h = hashlib.sha256()
    for i in sample_indices(n, samples):
        image, label = first if i == 0 else read(i)
        x = image.detach().cpu().contiguous()
        h.update(f"{i}:{label}:{x.dtype}:{tuple(x.shape)}:".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    fp["images_sha256"] = h.hexdigest()[:16]
    return fp
