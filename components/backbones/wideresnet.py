"""TRADES-style WideResNet (WRN-34-10), the target model of D2R, LBGAT and TRADES.

Layer for layer the same as TRADES ``models/wideresnet.py``, LBGAT ``models/wideresnet.py`` and D2R
``models/wideresnet.py`` / ``TinyImageNet_models/wide_resnet.py`` (METHODS.md 1.1). The authors' attribute
names (``block1``, ``sub_block1``, ``convShortcut``, ``equalInOut``, ...) and module creation order are kept
on purpose: their checkpoints load with ``strict=True``, and under the same seed the initial weights match
theirs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register


class BasicBlock(nn.Module):
    """Pre-activation wide residual block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    When the width changes, the pre-activated input feeds both the residual branch and a 1x1
    ``convShortcut``; otherwise the raw input is the identity shortcut (exactly as in the TRADES code).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output for feature map ``x``."""
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(out)))
        else:
            # The authors overwrite x with its pre-activation, so the 1x1 shortcut sees BN-ReLU(x).
            x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(x)
        return torch.add(shortcut, out)


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` :class:`BasicBlock` s; only the first one changes width and stride."""

    def __init__(
        self,
        nb_layers: int,
        in_planes: int,
        out_planes: int,
        block: type[BasicBlock],
        stride: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer = self._make_layer(block, in_planes, out_planes, nb_layers, stride, drop_rate)

    @staticmethod
    def _make_layer(
        block: type[BasicBlock],
        in_planes: int,
        out_planes: int,
        nb_layers: int,
        stride: int,
        drop_rate: float,
    ) -> nn.Sequential:
        layers = [
            block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(int(nb_layers))
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage on ``x``."""
        return self.layer(x)


def _conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3, padding-1 convolution with ``stride``."""
    return (size - 1) // stride + 1


class WideResNet(nn.Module):
    """WRN-depth-widen_factor as in the TRADES code, for ``image_size`` x ``image_size`` inputs in [0, 1].

    The forward pass is conv1 -> block1 -> block2 -> block3 -> BN-ReLU -> avg_pool2d(8) -> fc. ``sub_block1``
    is built (its parameters exist, are initialised and saved) but never called, exactly as in the authors'
    code: it matters for their state_dicts, for weight decay bookkeeping and for the RNG stream at init.
    The fc input size follows from the input size: 640 for 32x32 (8x8 map pooled to 1x1) and 640*4 for the
    Tiny-ImageNet 64x64 variant (16x16 map pooled by 8 to 2x2), as in D2R ``TinyImageNet_models``.
    """

    def __init__(
        self,
        depth: int = 34,
        num_classes: int = 10,
        widen_factor: int = 10,
        drop_rate: float = 0.0,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        nChannels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}.")
        n = (depth - 4) // 6
        block = BasicBlock
        # 1st conv before any network block
        self.conv1 = nn.Conv2d(in_channels, nChannels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, nChannels[0], nChannels[1], block, 1, drop_rate)
        # Unused in forward; kept for checkpoint compatibility with TRADES/LBGAT/D2R (METHODS.md 1.1).
        self.sub_block1 = NetworkBlock(n, nChannels[0], nChannels[1], block, 1, drop_rate)
        self.block2 = NetworkBlock(n, nChannels[1], nChannels[2], block, 2, drop_rate)
        self.block3 = NetworkBlock(n, nChannels[2], nChannels[3], block, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(nChannels[3])
        self.relu = nn.ReLU(inplace=True)

        final_map = _conv_out(_conv_out(image_size, 2), 2)
        pooled = final_map // 8
        if pooled < 1:
            raise ValueError(
                f"image_size={image_size} gives a {final_map}x{final_map} final map, "
                "too small for avg_pool2d(8)."
            )
        self.nChannels = nChannels[3] * pooled * pooled
        self.fc = nn.Linear(self.nChannels, num_classes)

        # TRADES init: He-normal with fan_out for convs, BN to identity, zero fc bias (fc weight keeps the
        # PyTorch default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch ``x`` in [0, 1] of shape (B, C, image_size, image_size)."""
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.reshape(out.size(0), -1)
        return self.fc(out)


@register("wideresnet")
def wideresnet(
    num_classes: int,
    in_channels: int = 3,
    depth: int = 34,
    widen_factor: int = 10,
    drop_rate: float = 0.0,
    image_size: int = 32,
) -> WideResNet:
    """Generic TRADES WideResNet; pick ``depth`` (6n+4) and ``widen_factor``."""
    return WideResNet(depth, num_classes, widen_factor, drop_rate, in_channels, image_size)


@register("wrn34_10")
def wrn34_10(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-34-10 for 32x32 inputs: the D2R/LBGAT/TRADES target model (about 46.16M params at 10 classes)."""
    return WideResNet(34, num_classes, 10, drop_rate, in_channels, image_size=32)


@register("wrn28_10")
def wrn28_10(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-28-10 for 32x32 inputs (same TRADES block layout, 4 blocks per stage)."""
    return WideResNet(28, num_classes, 10, drop_rate, in_channels, image_size=32)


@register("wrn34_10_tiny", input_size=64)
def wrn34_10_tiny(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-34-10 for 64x64 Tiny-ImageNet: avg_pool 8 leaves 2x2, so fc(640*4, K) (D2R TinyImageNet_models)."""
    return WideResNet(34, num_classes, 10, drop_rate, in_channels, image_size=64)
