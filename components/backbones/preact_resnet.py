"""Pre-activation ResNet-18 (He et al., 2016) in the kuangliu/D2R layout.

- ``preact_resnet18``: 32x32 inputs, strides 1,2,2,2, 4x4 final map, avg_pool 4, linear(512, K).
- ``preact_resnet18_tiny``: D2R ``TinyImageNet_models/preact_resnet.py`` for 64x64 inputs (the D2R
  Tiny-ImageNet target and the FGSM-PGK Tiny model): strides 1,2,2,2, 8x8 final map, avg_pool 4 leaves 2x2, so
  linear(2048, K); METHODS.md 1.1.

As in that code there is no BN-ReLU after the last stage (the output of layer4 is pooled directly);
``final_bn=True`` adds one (``bn``), the variant used by e.g. Rice et al. / Wong et al.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register
from .resnet import final_map_size


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, shortcut taken from the pre-activation."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        # The authors only create `shortcut` when a projection is needed; None keeps the same state_dict.
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output for feature map ``x``."""
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet for small images: 3x3 stem, four pre-activation stages, avg_pool2d(4), linear.

    The linear input size is 512 x expansion x (pooled side)^2, from ``image_size``: 512 at 32x32 and
    2048 at 64x64, as in the authors' files.
    """

    def __init__(
        self,
        block: type[PreActBlock],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        final_bn: bool = False,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        strides = (1, 2, 2, 2)

        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=strides[0])
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=strides[1])
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=strides[2])
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=strides[3])
        self.bn: nn.BatchNorm2d | None = nn.BatchNorm2d(512 * block.expansion) if final_bn else None

        final = final_map_size(image_size, strides)
        pooled = final // 4
        if pooled < 1:
            raise ValueError(
                f"image_size={image_size} gives a {final}x{final} final map, too small for avg_pool2d(4)."
            )
        self.linear = nn.Linear(512 * block.expansion * pooled * pooled, num_classes)

    def _make_layer(
        self, block: type[PreActBlock], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for s in strides:
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch ``x`` in [0, 1]."""
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        if self.bn is not None:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        out = out.reshape(out.size(0), -1)
        return self.linear(out)


def PreActResNet18(  # noqa: N802
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, final_bn: bool = False
) -> PreActResNet:
    """PreActResNet-18: linear(512, K) at 32x32, linear(2048, K) at 64x64."""
    return PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_channels, image_size, final_bn)


@register("preact_resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3, final_bn: bool = False) -> PreActResNet:
    """PreActResNet-18 for 32x32 inputs (avg_pool 4 -> linear(512, K))."""
    return PreActResNet18(num_classes, in_channels, image_size=32, final_bn=final_bn)


@register("preact_resnet18_tiny", input_size=64)
def preact_resnet18_tiny(num_classes: int, in_channels: int = 3, final_bn: bool = False) -> PreActResNet:
    """D2R/FGSM-PGK Tiny-ImageNet PreActResNet-18 for 64x64 inputs (avg_pool 4 -> linear(2048, K))."""
    return PreActResNet18(num_classes, in_channels, image_size=64, final_bn=final_bn)
