"""The 16 Comp-DD subsets of ImageNet-1K, as published by EDF's authors (class indices, listed order).

``music_hard`` lists class 420 twice (positions 0 and 2), so it has 9 distinct classes. Taking
positions as labels would leave one label without images and break every per-class loss, so
:func:`classes` refuses it unless deduplication is asked for explicitly (``dedupe=True``: the
first occurrence of each class is kept, in the listed order).
"""
from __future__ import annotations

import difflib
from types import MappingProxyType
from typing import Mapping, Sequence

__all__ = ["SUBSETS", "NUM_IMAGENET_CLASSES", "subsets", "categories", "classes", "check_classes", "lookup"]

NUM_IMAGENET_CLASSES = 1000

#: name -> ImageNet-1K class indices, exactly as the authors list them (duplicates included).
SUBSETS: Mapping[str, tuple[int, ...]] = MappingProxyType({
    "birds_hard": (14, 19, 91, 15, 13, 95, 10, 16, 20, 12),
    "birds_easy": (130, 140, 83, 142, 134, 139, 88, 90, 144, 21),
    "cars_hard": (802, 660, 829, 627, 609, 575, 573, 867, 734, 408),
    "cars_easy": (581, 535, 717, 817, 511, 436, 656, 757, 661, 751),
    "dogs_hard": (239, 238, 247, 195, 151, 266, 157, 181, 154, 217),
    "dogs_easy": (193, 180, 227, 167, 246, 248, 224, 177, 269, 252),
    "fish_hard": (0, 391, 389, 395, 4, 396, 2, 394, 50, 103),
    "fish_easy": (5, 1, 6, 397, 390, 3, 392, 393, 148, 147),
    "snake_hard": (46, 42, 41, 40, 43, 58, 65, 59, 53, 52),
    "snake_easy": (64, 57, 55, 56, 61, 62, 68, 67, 54, 60),
    "insect_hard": (301, 326, 324, 305, 325, 300, 318, 320, 70, 322),
    "insect_easy": (323, 314, 310, 309, 306, 308, 302, 313, 303, 315),
    "round_hard": (852, 805, 736, 892, 429, 574, 722, 522, 752, 971),
    "round_easy": (417, 560, 953, 826, 426, 981, 430, 890, 746, 768),
    "music_hard": (420, 594, 420, 579, 402, 776, 486, 401, 546, 558),
    "music_easy": (542, 687, 494, 566, 642, 513, 875, 683, 889, 881),
})


def subsets() -> tuple[str, ...]:
    """The 16 subset names, in the published order (``birds_hard`` ... ``music_easy``)."""
    return tuple(SUBSETS)


def categories() -> tuple[str, ...]:
    """The 8 categories (``birds`` ... ``music``); category ``c`` has subsets ``c_easy`` and ``c_hard``."""
    seen: dict[str, None] = {}
    for name in SUBSETS:
        seen.setdefault(name.rsplit("_", 1)[0], None)
    return tuple(seen)


def _duplicates(cls: Sequence[int]) -> list[tuple[int, list[int]]]:
    """``[(class, [positions])]`` for every class listed more than once, in order of first listing."""
    pos: dict[int, list[int]] = {}
    for i, c in enumerate(cls):
        pos.setdefault(c, []).append(i)
    return [(c, p) for c, p in pos.items() if len(p) > 1]


def _and(items: list[int]) -> str:
    s = [str(i) for i in items]
    return s[0] if len(s) == 1 else ", ".join(s[:-1]) + " and " + s[-1]


def check_classes(cls: Sequence[int], *, what: str = "classes", dedupe: bool = False,
                  how: str = "pass dedupe=True") -> list[int]:
    """Validate a class list: ints in ``[0, 1000)``, non-empty, no duplicate unless ``dedupe``.

    Returns the list (deduplicated, first occurrences kept in order, when ``dedupe=True``).
    """
    if isinstance(cls, (str, bytes)) or not isinstance(cls, Sequence):
        raise TypeError(f"{what} must be a sequence of ImageNet-1K class indices, got {type(cls).__name__}")
    out = []
    for i, c in enumerate(cls):
        if isinstance(c, bool) or not isinstance(c, int):
            try:  # numpy / 0-d tensor integers
                import operator
                c = operator.index(c)
            except TypeError:
                raise TypeError(f"{what}[{i}] must be an int, got {type(c).__name__}") from None
        if not 0 <= c < NUM_IMAGENET_CLASSES:
            raise ValueError(f"{what}[{i}] = {c} is not an ImageNet-1K class index (expected 0 <= index < "
                             f"{NUM_IMAGENET_CLASSES})")
        out.append(int(c))
    if not out:
        raise ValueError(f"{what} must list at least one class, got an empty list")
    dups = _duplicates(out)
    if dups and not dedupe:
        desc = "; ".join(f"class {c} is listed {len(p)} times (positions {_and(p)})" for c, p in dups)
        distinct = len(set(out))
        raise ValueError(f"{what}: {desc}, so labelling by position would leave a label with no images. "
                         f"To use its {distinct} distinct classes (first occurrence kept, in the listed order), "
                         f"{how}.")
    if dups:
        seen: set[int] = set()
        out = [c for c in out if not (c in seen or seen.add(c))]
    return out


def lookup(name: str) -> tuple[int, ...]:
    """Subset ``name``'s classes exactly as published (duplicates included); an unknown name is a
    ``ValueError`` suggesting close names."""
    if not isinstance(name, str):
        raise TypeError(f"subset name must be a str, got {type(name).__name__}")
    if name not in SUBSETS:
        close = difflib.get_close_matches(name, list(SUBSETS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown Comp-DD subset {name!r}.{hint} Known subsets: {', '.join(SUBSETS)}")
    return SUBSETS[name]


def classes(name: str, *, dedupe: bool = False) -> list[int]:
    """ImageNet-1K class indices of subset ``name``, in the published order; label ``i`` is entry ``i``.

    Raises ``ValueError`` for an unknown name (suggesting close names), and for ``music_hard``
    (class 420 listed twice) unless ``dedupe=True``, which returns its 9 distinct classes.
    """
    return check_classes(lookup(name), what=f"Comp-DD subset {name!r}", dedupe=dedupe,
                         how=f"call classes({name!r}, dedupe=True) or subset(dataset, {name!r}, dedupe=True)")
