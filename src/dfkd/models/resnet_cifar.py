"""CIFAR ResNets: the 3-stage resnet8..56 family (He et al.) and 4-stage resnet18/34.

Both use a 3x3 stride-1 stem and no max-pool, since 32x32 inputs cannot afford the
ImageNet stem's 4x downsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import init_weights, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; 1x1 conv+BN shortcut (option B) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv of widths[0], then one stage per width (first stride 1, others stride 2)."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(blocks, widths, strict=True)):
            layers: list[nn.Module] = []
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if i and not j else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> ResNet:
    n = (depth - 2) // 6
    return ResNet((n, n, n), (16, 32, 64), num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def resnet8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(8, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(20, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(32, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(56, num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def resnet34(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, in_channels)
