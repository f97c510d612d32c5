"""The named configurations of docs/benchmarks.md, and how a benchmark scales them down.

Every benchmark and memory profile builds its inputs from one of these by name.
Where the papers' configs leave a number open, the choice is written next to it:

* ``cam``: every config uses EDF's CAM network, torchvision ResNet-18 ``layer4`` at
  128 px, so the maps are ``512 x 4 x 4`` (docs/ops.md) and DAE upsamples them to the
  image size. ``cam_samples`` = 4 noisy passes (``CAMExtractor``'s default).
* ``beta`` / ``drop_ratio``: EDF's values for ImageNette and ImageWoof; the other
  configs use EDF's main setting (beta 1, drop 0.375).
* ``cc_dim``: CC's 512-d ResNet-18 features exist where docs/benchmarks.md lists them
  (``in1k-ipc50`` has none, so CC is skipped there).
* DM's flat features for :func:`~edfkern.mean_matching_loss` are the local features
  reshaped, ``C*L`` = 2048-d (docs/ops.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["Config", "CONFIGS", "DEFAULT_CONFIG", "get_config"]


@dataclass(frozen=True)
class Config:
    name: str
    K: int                          # classes
    ipc: int                        # synthetic images per class
    image: tuple[int, int, int]     # (C, H, W) of the synthetic images
    local: Optional[tuple[int, int]] = None   # IID local conv features (C, L); None: no IID ops
    real_per_class: Optional[int] = None      # real rows per class for the matching losses
    cc_dim: Optional[int] = None              # CC feature size; None: no CC
    cpd_P: Optional[int] = None               # expert parameter count; None: no CPD
    beta: float = 1.0
    drop_ratio: float = 0.375
    cam: tuple[int, int, int] = (512, 4, 4)   # (C, h, w) of the CAM layer
    cam_samples: int = 4                      # smoothgradcam++ noisy passes S
    scale: float = 1.0                        # 1.0 = the config's full size; see scaled()

    @property
    def N(self) -> int:
        return self.K * self.ipc

    @property
    def N_real(self) -> int:
        return self.K * (self.real_per_class or 0)

    def scaled(self, scale: float) -> "Config":
        """The same config with IPC, real rows per class and CPD's P multiplied by ``scale``.

        K, image size and feature sizes stay: the per-class loop structure is what the
        baselines pay for, so only the per-class row count shrinks. IPC and real rows
        never drop below 2 (a covariance of one row is zero); P never below 1,000.
        """
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if scale == 1.0:
            return self
        return dataclasses.replace(
            self,
            ipc=max(2, round(self.ipc * scale)),
            real_per_class=None if self.real_per_class is None else max(2, round(self.real_per_class * scale)),
            cpd_P=None if self.cpd_P is None else max(1000, round(self.cpd_P * scale)),
            scale=self.scale * scale,
        )

    def with_ipc(self, ipc: int) -> "Config":
        """The config at another IPC (for ``--sweep ipc=...``); nothing else changes."""
        if ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        return dataclasses.replace(self, ipc=int(ipc))


_LOCAL = (128, 16)
CONFIGS: dict[str, Config] = {c.name: c for c in (
    Config("imagenette-ipc50", K=10, ipc=50, image=(3, 128, 128), cpd_P=615_690, beta=1.0, drop_ratio=0.375),
    Config("imagewoof-ipc10", K=10, ipc=10, image=(3, 128, 128), cpd_P=615_690, beta=2.0, drop_ratio=0.25),
    Config("cifar10-ipc1000", K=10, ipc=1000, image=(3, 32, 32), local=_LOCAL, real_per_class=256, cc_dim=512,
           cpd_P=320_010),
    Config("cifar100-ipc50", K=100, ipc=50, image=(3, 32, 32), local=_LOCAL, real_per_class=256, cc_dim=512),
    Config("tiny-ipc50", K=200, ipc=50, image=(3, 64, 64), local=_LOCAL, real_per_class=256, cc_dim=512),
    Config("in1k-ipc50", K=1000, ipc=50, image=(3, 64, 64), local=_LOCAL, real_per_class=64,
           cpd_P=11_200_000),
)}

#: The docs/benchmarks.md CPU targets are stated at this config.
DEFAULT_CONFIG = "cifar10-ipc1000"


def get_config(name: str) -> Config:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; expected one of {list(CONFIGS)}") from None
