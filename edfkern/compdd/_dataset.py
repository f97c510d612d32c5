"""A Comp-DD subset of any map-style ImageNet-1K dataset, relabelled ``0..K-1`` by one mapping.

The released loader relabels class by class, in place. ``fish_hard`` and ``fish_easy`` contain
ImageNet classes 0-6, which collide with the new labels 0-9, so in-place relabelling merges
classes. Here the labels are read once, mapped once through a lookup table built from the
listed order (label ``i`` is ``classes[i]``), and never written back into the base dataset.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset, Subset

from ._subsets import NUM_IMAGENET_CLASSES, check_classes, classes as subset_classes

__all__ = ["CompSubset", "subset", "read_labels", "stored_labels"]


def stored_labels(dataset: Any) -> Optional[torch.Tensor]:
    """:func:`read_labels` when the labels can be read without loading any item (``.targets``, also
    through ``torch.utils.data.Subset``); ``None`` when reading them would load every image."""
    if isinstance(dataset, Subset) and not hasattr(dataset, "targets"):
        inner = stored_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    return read_labels(dataset) if getattr(dataset, "targets", None) is not None else None


def read_labels(dataset: Any) -> torch.Tensor:
    """All labels of a map-style dataset, as an int64 tensor ``(len(dataset),)``.

    Read from ``dataset.targets`` when it exists (torchvision ``ImageFolder``/``ImageNet``, CIFAR,
    :class:`CompSubset`, ...), also through a ``torch.utils.data.Subset`` of such a dataset, so no
    image is loaded. Otherwise every item is loaded once and its second element taken as the label.
    """
    if isinstance(dataset, Subset) and not hasattr(dataset, "targets") and hasattr(dataset.dataset, "targets"):
        return read_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        t = torch.as_tensor(targets.tolist() if hasattr(targets, "tolist") and not isinstance(targets, torch.Tensor)
                            else targets)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"dataset.targets must hold one label per item ({n}), got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"dataset.targets must hold integer labels, got {t.dtype}")
        return t.to(torch.long)
    labels = []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"dataset items must be (image, label, ...) tuples, got {type(item).__name__} at {i}")
        labels.append(int(item[1]))
    return torch.tensor(labels, dtype=torch.long)


class CompSubset(Dataset):
    """The items of ``base`` whose ImageNet-1K label is in ``classes``, with labels ``0..K-1``.

    Attributes:
        base: the wrapped dataset (never modified).
        name: the subset's name, or ``None`` for a custom class list.
        classes: the ImageNet-1K class of each new label (label ``i`` is ``classes[i]``).
        indices: ``(M,)`` positions in ``base`` of the subset's items, in ``base``'s order.
        targets: ``(M,)`` new labels, ``targets[j]`` for item ``j``.
        class_index: per new label, the positions ``j`` (into this subset) of its items: the
            ``indices_class`` that DC/DM/MTT-style loops use to draw real images class by class.
    """

    def __init__(self, base: Any, classes: list[int], indices: torch.Tensor, targets: torch.Tensor,
                 name: Union[str, None] = None) -> None:
        self.base = base
        self.name = name
        self.classes = list(classes)
        self.indices = indices
        self.targets = targets
        order = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets, minlength=len(classes)).tolist()
        self.class_index: list[list[int]] = [chunk.tolist() for chunk in torch.split(order, counts)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, j: int):
        item = self.base[int(self.indices[j])]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"base dataset items must be (image, label, ...) tuples, got {type(item).__name__}")
        return (item[0], int(self.targets[j])) + tuple(item[2:])

    def class_counts(self) -> list[int]:
        """Items per new label."""
        return [len(ix) for ix in self.class_index]

    def __repr__(self) -> str:
        what = repr(self.name) if self.name else "custom"
        return f"CompSubset({what}, classes={self.classes}, items={len(self)})"


def subset(dataset: Any, name_or_classes: Union[str, Sequence[int]], *, dedupe: bool = False) -> CompSubset:
    """Wrap a map-style ImageNet-1K dataset as a Comp-DD subset with labels ``0..K-1``.

    Args:
        dataset: any map-style dataset whose labels are ImageNet-1K class indices: a torchvision
            ``ImageFolder``/``ImageNet`` (on the standard train/val folders, whose sorted wnids give
            the standard indices), anything with ``.targets``, or plain ``(image, label)`` items
            (then each item is loaded once to read its label).
        name_or_classes: a subset name (``"fish_hard"``, see :func:`subsets`) or a list of
            ImageNet-1K class indices; label ``i`` is the ``i``-th listed class.
        dedupe: allow a class listed twice (``music_hard``), keeping its first occurrence.

    Returns:
        A :class:`CompSubset`; ``.class_index[c]`` lists the items of label ``c``.

    Raises:
        ValueError: unknown subset name, class outside ``[0, 1000)``, a duplicate class without
            ``dedupe``, dataset labels outside ``[0, 1000)`` or none of the classes present (the labels
            are not ImageNet-1K indices), or some listed class without any image (it would be empty).
    """
    if isinstance(name_or_classes, str):
        name = name_or_classes
        cls = subset_classes(name, dedupe=dedupe)
    else:
        name = None
        cls = check_classes(name_or_classes, what="name_or_classes", dedupe=dedupe)
    labels = read_labels(dataset)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_IMAGENET_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_IMAGENET_CLASSES)][0]
        raise ValueError(f"dataset labels must be ImageNet-1K class indices in [0, {NUM_IMAGENET_CLASSES}), "
                         f"found label {int(bad)}")
    lut = torch.full((NUM_IMAGENET_CLASSES,), -1, dtype=torch.long)
    lut[torch.tensor(cls)] = torch.arange(len(cls))  # the one mapping, in the listed order
    mapped = lut[labels]
    keep = mapped >= 0
    what = repr(name) if name else "the given classes"
    if not bool(keep.any()):
        raise ValueError(f"none of the classes of {what} ({cls}) occurs in the dataset's labels; are its labels "
                         f"ImageNet-1K class indices (e.g. an ImageFolder over the ImageNet train folder), not "
                         f"already relabelled ones?")
    targets = mapped[keep]
    counts = torch.bincount(targets, minlength=len(cls))
    empty = [cls[i] for i in range(len(cls)) if int(counts[i]) == 0]
    if empty:
        raise ValueError(f"classes {empty} of {what} have no images in the dataset; they would be empty classes")
    return CompSubset(dataset, cls, keep.nonzero().flatten(), targets, name)

