"""Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation blocks, dropout 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import init_weights, register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 conv shortcut on the pre-activated input if shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen: three groups of (depth-4)/6 blocks at widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for i, cout in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if i and not j else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(input_shape=(3, 32, 32))
def wrn_16_1(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(16, 1, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def wrn_16_2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(16, 2, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def wrn_40_1(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(40, 1, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def wrn_40_2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(40, 2, num_classes, in_channels)
