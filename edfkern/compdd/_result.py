"""Per-class, per-layer complexity scores: saving, ranking into easy/hard, plotting."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["ComplexityResult"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class ComplexityResult:
    """What :func:`edfkern.compdd.score` returns.

    Attributes:
        layers: the scored layers' names, in order.
        complexity: ``(K, L)`` float64, the mean over class ``k``'s images of ``1 - fraction of
            map pixels above the threshold`` at layer ``l``; NaN for a class with no image.
        counts: ``(K,)`` int64, images scored per class (padded duplicates of a sharded run excluded).
        config: the scoring configuration (method, threshold, strict, num_samples, std, seed, ...).
        class_names: what each label stands for (e.g. the ImageNet-1K index of a subset's label,
            or an ImageFolder's folder name), when the dataset says so; else ``None``.
        nonfinite: dataset indices of the images left out because they (or their CAM maps) held
            NaN or inf, sorted; not in ``counts``.

    A class's overall complexity (:meth:`class_complexity` with ``layer=None``) is the mean of its
    per-layer values, each layer weighted equally.
    """

    layers: list[str]
    complexity: Tensor
    counts: Tensor
    config: dict = field(default_factory=dict)
    class_names: Optional[list] = None
    nonfinite: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    def class_complexity(self, layer: Optional[str] = None) -> Tensor:
        """``(K,)`` complexity per class at ``layer`` (a name in :attr:`layers`), or the mean over layers."""
        if layer is None:
            return self.complexity.mean(1)
        if layer not in self.layers:
            raise ValueError(f"layer must be one of {self.layers} (or None for the mean), got {layer!r}")
        return self.complexity[:, self.layers.index(layer)]

    # ------------------------------------------------------------------ ranking

    def rank(self, category_classes: Sequence[int], *, k: int = 10, layer: Optional[str] = None) -> dict[str, list[int]]:
        """Split a category into its hard and easy subsets.

        Args:
            category_classes: the labels (class indices in this result) of one category, e.g. all
                ImageNet-1K bird classes; at least ``2 * k``, each with scored images.
            k: classes per subset (Comp-DD: 10).
            layer: rank by one layer's complexity; ``None`` (default) by the mean over layers.

        Returns:
            ``{"hard": the k most complex classes, most complex first, "easy": the k least complex,
            least complex first}``; ties keep ``category_classes``' order.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        cls = list(category_classes)
        for c in cls:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
                raise ValueError(f"category_classes must hold class indices in [0, {self.num_classes}), got {c!r}")
        if len(set(cls)) != len(cls):
            raise ValueError("category_classes lists a class more than once")
        if len(cls) < 2 * k:
            raise ValueError(f"category_classes must hold at least 2*k = {2 * k} classes so that easy and hard "
                             f"do not overlap, got {len(cls)}")
        unscored = [c for c in cls if int(self.counts[c]) == 0]
        if unscored:
            raise ValueError(f"classes {unscored} have no scored images")
        values = self.class_complexity(layer)
        order = sorted(range(len(cls)), key=lambda i: (-float(values[cls[i]]), i))
        hard = [cls[i] for i in order[:k]]
        order = sorted(range(len(cls)), key=lambda i: (float(values[cls[i]]), i))
        easy = [cls[i] for i in order[:k]]
        return {"hard": hard, "easy": easy}

    # ------------------------------------------------------------------ saving

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> Optional[float]:
            return None if math.isnan(x) else x

        return {
            "layers": list(self.layers),
            "config": dict(self.config),
            "classes": [
                {"label": k, "name": None if self.class_names is None else self.class_names[k],
                 "count": int(self.counts[k]),
                 "complexity": {name: num(float(self.complexity[k, j])) for j, name in enumerate(self.layers)},
                 "mean": num(float(self.complexity[k].mean()))}
                for k in range(self.num_classes)
            ],
            "nonfinite": [int(i) for i in self.nonfinite],
        }

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """JSON text (NaN written as ``null``); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: Union[PathLike, str]) -> "ComplexityResult":
        """Read what :meth:`to_json` wrote (a path, or the JSON text itself)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        d = json.loads(text)
        layers = d["layers"]
        rows = d["classes"]
        comp = torch.tensor([[math.nan if r["complexity"][n] is None else r["complexity"][n] for n in layers]
                             for r in rows], dtype=torch.float64).reshape(len(rows), len(layers))
        names = [r["name"] for r in rows]
        return cls(layers=layers, complexity=comp, counts=torch.tensor([r["count"] for r in rows], dtype=torch.long),
                   config=d.get("config", {}), class_names=None if all(n is None for n in names) else names,
                   nonfinite=[int(i) for i in d.get("nonfinite", [])])

    def to_csv(self, path: Optional[PathLike] = None) -> str:
        """CSV text, one row per class: ``label, name, count, <one column per layer>, mean``."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["label", "name", "count", *self.layers, "mean"])
        for k in range(self.num_classes):
            name = "" if self.class_names is None else self.class_names[k]
            vals = [repr(float(v)) for v in self.complexity[k]]
            w.writerow([k, name, int(self.counts[k]), *vals, repr(float(self.complexity[k].mean()))])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    # ------------------------------------------------------------------ plotting

    def plot(self, path: PathLike, category_classes: Optional[Sequence[int]] = None, *, k: int = 10,
             layer: Optional[str] = None) -> None:
        """Bar chart of class complexity, sorted, saved to ``path`` (any format matplotlib writes).

        With ``category_classes`` the bars are that category's classes, the :meth:`rank` hard
        subset in red and the easy subset in blue; without, every scored class in grey.
        Needs matplotlib (``pip install matplotlib``).
        """
        try:
            import matplotlib
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("ComplexityResult.plot needs matplotlib: pip install matplotlib") from e
        values = self.class_complexity(layer)
        if category_classes is None:
            cls = [c for c in range(self.num_classes) if int(self.counts[c]) > 0]
            split = {"hard": [], "easy": []}
        else:
            cls = list(category_classes)
            split = self.rank(cls, k=k, layer=layer)
        cls.sort(key=lambda c: -float(values[c]))
        colour = {c: "tab:red" for c in split["hard"]} | {c: "tab:blue" for c in split["easy"]}
        fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(cls)), 4.0))
        try:
            ax.bar(range(len(cls)), [float(values[c]) for c in cls], color=[colour.get(c, "tab:grey") for c in cls])
            names = [str(c if self.class_names is None else self.class_names[c]) for c in cls]
            ax.set_xticks(range(len(cls)), names, rotation=90, fontsize=6)
            ax.set_ylabel(f"complexity ({layer or 'mean over ' + ', '.join(self.layers)})")
            ax.set_xlabel("class")
            if split["hard"]:
                from matplotlib.patches import Patch
                ax.legend(handles=[Patch(color="tab:red", label=f"hard ({len(split['hard'])} most complex)"),
                                   Patch(color="tab:blue", label=f"easy ({len(split['easy'])} least complex)"),
                                   Patch(color="tab:grey", label="other")])
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)
