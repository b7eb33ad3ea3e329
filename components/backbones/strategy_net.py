"""LAS-AT's strategy network: a registered backbone's trunk with one linear head per attack parameter.

``ResNet18_Strategy`` (jiaxiaojunQAQ/LAS-AT ``LAS_PGD_AT/StrategyNet.py`` L73-119, L159-160) is the CIFAR
ResNet-18 trunk (``resnet18`` here: strides 1,2,2,2, avg_pool 4, 512 features) with four linear heads on
the pooled feature, one per candidate list (attack method, epsilon, iterations, step size). The Tiny
ImageNet file (``TinyImageNet_StrategyNet.py`` L86-90) runs the same trunk on 64x64 inputs, so its heads
read 2048 features: ``resnet18_tiny`` here. Any registered backbone can be the trunk (``small_cnn`` in the
``smoke`` profile): its last ``nn.Linear`` (the classifier) is replaced by the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import gin
import torch
from torch import nn

from .registry import build_backbone


def _drop_classifier(net: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of ``net`` by the identity; return its input width (the features)."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear classifier to replace with strategy heads")
    name, last = linears[-1]
    parent = net
    *path, leaf = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, nn.Identity())
    return last.in_features


class StrategyNet(nn.Module):
    """A trunk (pooled features) and one linear head per attack parameter; ``forward`` returns head logits.

    The heads are created in the order of ``head_sizes`` (the authors' order: method, epsilon,
    iterations, step size) and return their logits in that order, as the authors' ``forward`` does.
    """

    def __init__(self, trunk: nn.Module, features: int, head_sizes: Sequence[int]) -> None:
        super().__init__()
        if not head_sizes or any(int(k) < 1 for k in head_sizes):
            raise ValueError(f"StrategyNet needs at least one head of size >= 1, got {tuple(head_sizes)}")
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, int(k)) for k in head_sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One (B, K_j) logit tensor per head for a clean batch ``x`` in [0, 1]."""
        features = self.trunk(x)
        return tuple(head(features) for head in self.heads)


class HasHeads(Protocol):
    """What the builder reads from a strategy space (``components.attacks.StrategySpace``)."""

    @property
    def head_sizes(self) -> tuple[int, ...]: ...


@gin.configurable
def build_strategy_net(name: str = gin.REQUIRED, space: HasHeads = gin.REQUIRED) -> StrategyNet:
    """The strategy network on the registered backbone ``name``, one head per candidate list of ``space``."""
    trunk = build_backbone(name=name, num_classes=1)
    features = _drop_classifier(trunk)
    return StrategyNet(trunk, features, space.head_sizes)
