"""Comp-DD, EDF's complex-scenario benchmark: 16 ten-class ImageNet-1K subsets, easy and hard per category.

* :data:`SUBSETS`, :func:`subsets`, :func:`classes`, :func:`categories`: the published class
  lists as data (``music_hard`` lists class 420 twice: :func:`classes` refuses it unless
  ``dedupe=True`` asks for its 9 distinct classes).
* :func:`subset`: wrap any map-style ImageNet-1K dataset as a subset with labels ``0..K-1``
  (one mapping, in the listed order) and a per-class index for DD loops.
* :func:`score`: the class-complexity measure the subsets were chosen by, streaming, resumable
  and sharded under ``torchrun``; :class:`ComplexityResult` saves, ranks and plots it. A resumed
  run must match the checkpoint's model, options and dataset fingerprint; non-finite images are
  left out and reported (:class:`NonFiniteImagesWarning`); ``K <= MAX_CLASSES``.
* ``python -m edfkern.compdd score ...``: the same from the command line.

Guide: ``docs/compdd.md``.
"""
from ._dataset import CompSubset, read_labels, subset
from ._result import ComplexityResult
from ._score import MAX_CLASSES, NonFiniteImagesWarning, image_noise, load_maps, score
from ._subsets import SUBSETS, categories, classes, subsets

__all__ = ["SUBSETS", "subsets", "categories", "classes", "subset", "CompSubset", "read_labels",
           "score", "ComplexityResult", "load_maps", "image_noise", "NonFiniteImagesWarning", "MAX_CLASSES"]
