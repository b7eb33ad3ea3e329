"""A small, fast CNN for CPU smoke tests and end-to-end pipeline checks (not for reported results)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register


def _conv_bn_relu(in_planes: int, out_planes: int, stride: int, norm: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=not norm),
        nn.BatchNorm2d(out_planes) if norm else nn.Identity(),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (width, 2x width, 4x width; the last two stride 2), global average pool,
    linear.

    Global pooling makes it work for any input size (28x28 MNIST, 32x32 CIFAR, 64x64 Tiny) and any number
    of input channels. It has BatchNorm so train/eval-mode code paths (e.g. BN mode during attacks) are
    exercised the same way as in the real backbones. ``norm=False`` drops it, for checks that need a
    model whose output for one example does not depend on the rest of the batch (data-parallel equality).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 32, norm: bool = True
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width, stride=1, norm=norm),
            _conv_bn_relu(width, 2 * width, stride=2, norm=norm),
            _conv_bn_relu(2 * width, 4 * width, stride=2, norm=norm),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch ``x`` in [0, 1]."""
        out = self.pool(self.features(x))
        return self.fc(out.flatten(1))


@register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32, norm: bool = True) -> SmallCNN:
    """Small CPU-friendly CNN (about 0.1M params at width 32)."""
    return SmallCNN(num_classes, in_channels, width, norm)
