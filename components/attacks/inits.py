"""Starting points for iterative attacks: where x' starts before the first gradient step."""

from __future__ import annotations

import gin
import torch
from torch import Tensor


class Init:
    """Maps a clean batch ``x`` in [0,1] and a radius ``eps`` to a starting point (no gradient)."""

    name = "init"

    def __call__(self, x: Tensor, eps: float) -> Tensor:
        raise NotImplementedError


@gin.configurable
class GaussianInit(Init):
    """TRADES/LBGAT/D2R start: ``x + std * N(0, I)``, deliberately not clipped before the first step.

    ``clip=True`` clips it to [0, 1], as FAT's ``earlystop.py`` L30-32 does for its normal start.
    """

    name = "gaussian"

    def __init__(self, std: float = 0.001, clip: bool = False) -> None:
        self.std = std
        self.clip = clip

    def __call__(self, x: Tensor, eps: float) -> Tensor:
        start = x + self.std * torch.randn_like(x)
        return start.clamp_(0.0, 1.0) if self.clip else start


@gin.configurable
class UniformInit(Init):
    """Madry-style start: uniform in the eps-ball, clipped to the image box."""

    name = "uniform"

    def __call__(self, x: Tensor, eps: float) -> Tensor:
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)


@gin.configurable
class RandomSignInit(Init):
    """FGSM-PGI/PGK reset and RegMix delta_initial: ``eps * sign(U(-1, 1))`` per pixel, clipped to [0,1]."""

    name = "random_sign"

    def __call__(self, x: Tensor, eps: float) -> Tensor:
        sign = torch.empty_like(x).uniform_(-1.0, 1.0).sign()
        return (x + eps * sign).clamp_(0.0, 1.0)


@gin.configurable
class ZeroInit(Init):
    """Start at the clean input (plain FGSM/BIM)."""

    name = "zero"

    def __call__(self, x: Tensor, eps: float) -> Tensor:
        return x.clone()
