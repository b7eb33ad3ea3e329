"""CIFAR-style ResNet-18 in the layouts the reproduced papers use.

- ``resnet18``: the standard CIFAR ResNet-18 of FGSM-PGI/PGK ``models/resnet.py`` (strides 1,2,2,2, 4x4 final
  map, avg_pool 4, linear(512, K)); METHODS.md 3.2.
- ``resnet18_lbgat``: the LBGAT/D2R guide ``ResNet18_cifar`` (strides 1,1,2,2, 8x8 final map, avg_pool 8,
  linear(512, K)), identical to LBGAT ``models/resnetcifar.py``; about 3-4x the FLOPs of ``resnet18``.
- ``resnet18_lbgat_tiny``: D2R ``TinyImageNet_models/resnet.py`` ``ResNet18_cifar`` for 64x64 inputs (strides
  1,2,2,2, 8x8 final map, avg_pool 8, linear(512, K)); METHODS.md 1.1.
- ``resnet18_tiny``: the standard ResNet-18 run on 64x64 inputs (strides 1,2,2,2, 8x8 map, avg_pool 4 leaves
  2x2, linear(2048, K)). FGSM-PGI's ``ImageNet_models`` file is not public in the sources we have; this is
  the common Tiny-ImageNet adaptation and matches the Tiny PreActResNet-18 convention (linear(2048, K)).

Attribute names (conv1, bn1, layer1..4, linear, shortcut) and creation order follow the authors' code, so
their checkpoints load with ``strict=True``. Default PyTorch initialisation, as in their code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add (projected) shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        # An empty Sequential is the identity and keeps the authors' (parameter-free) module name.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output for feature map ``x``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


def final_map_size(image_size: int, strides: Sequence[int]) -> int:
    """Side length of the last feature map after the stem (stride 1) and stages with ``strides``."""
    size = image_size
    for stride in strides:
        size = (size - 1) // stride + 1
    return size


class ResNet(nn.Module):
    """ResNet for small images: 3x3 stem, four stages of ``num_blocks``, avg_pool2d(pool_size), linear.

    ``strides`` and ``pool_size`` select the layout (see the module docstring); the linear input size is
    512 x expansion x (pooled side)^2, computed from ``image_size`` as in the authors' fixed numbers.
    """

    def __init__(
        self,
        block: type[BasicBlock],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        strides: Sequence[int] = (1, 2, 2, 2),
        pool_size: int = 4,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if len(strides) != 4 or len(num_blocks) != 4:
            raise ValueError(f"Need 4 stages, got strides={tuple(strides)}, num_blocks={tuple(num_blocks)}.")
        self.in_planes = 64
        self.pool_size = pool_size

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=strides[0])
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=strides[1])
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=strides[2])
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=strides[3])

        final = final_map_size(image_size, strides)
        pooled = final // pool_size
        if pooled < 1:
            raise ValueError(
                f"image_size={image_size} gives a {final}x{final} final map, too small for "
                f"avg_pool2d({pool_size})."
            )
        self.linear = nn.Linear(512 * block.expansion * pooled * pooled, num_classes)

    def _make_layer(
        self, block: type[BasicBlock], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for s in strides:
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch ``x`` in [0, 1]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, self.pool_size)
        out = out.reshape(out.size(0), -1)
        return self.linear(out)


def ResNet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet:  # noqa: N802
    """Standard CIFAR ResNet-18 (FGSM-PGI/PGK): strides 1,2,2,2, avg_pool 4."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, (1, 2, 2, 2), 4, image_size)


def ResNet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:  # noqa: N802
    """LBGAT/D2R guide ResNet-18 for 32x32: strides 1,1,2,2, 8x8 final map, avg_pool 8."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, (1, 1, 2, 2), 8, 32)


def ResNet18_cifar_tiny(num_classes: int = 200, in_channels: int = 3) -> ResNet:  # noqa: N802
    """D2R Tiny-ImageNet ``ResNet18_cifar`` for 64x64: strides 1,2,2,2, 8x8 final map, avg_pool 8."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, (1, 2, 2, 2), 8, 64)


@register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """Standard CIFAR ResNet-18 (FGSM-PGI/PGK, RegMix base model), linear(512, K) at 32x32."""
    return ResNet18(num_classes, in_channels, image_size)


@register("resnet18_lbgat")
def resnet18_lbgat(num_classes: int, in_channels: int = 3) -> ResNet:
    """LBGAT/D2R guide ``ResNet18_cifar`` (strides 1,1,2,2, 8x8 final map), linear(512, K)."""
    return ResNet18_cifar(num_classes, in_channels)


@register("resnet18_lbgat_tiny", input_size=64)
def resnet18_lbgat_tiny(num_classes: int, in_channels: int = 3) -> ResNet:
    """D2R Tiny-ImageNet guide ``ResNet18_cifar`` (64x64, strides 1,2,2,2, avg_pool 8), linear(512, K)."""
    return ResNet18_cifar_tiny(num_classes, in_channels)


@register("resnet18_tiny", input_size=64)
def resnet18_tiny(num_classes: int, in_channels: int = 3) -> ResNet:
    """Standard ResNet-18 on 64x64 inputs (strides 1,2,2,2, avg_pool 4 leaves 2x2), linear(2048, K)."""
    return ResNet18(num_classes, in_channels, image_size=64)
