"""The classic CIFAR ResNet with "option A" shortcuts, as checkpoints of it are published.

He et al. (2016) section 4.2: three stages of 16/32/64 channels, n basic blocks each (depth
6n+2), and parameter-free shortcuts that subsample and zero-pad channels where a stage begins.
The module names (`conv1`, `bn1`, `layer1..3`, `linear`) are those of the widely used
akamaster/pytorch_resnet_cifar10 checkpoints (resnet20-12fca82f.th, resnet56-4bfd9763.th, ...),
so those files load with `--arch resnet20a` as published: their nested `state_dict` and
DataParallel's `module.` prefix are unwrapped by the loader (dfkd.models.classifier). The same names
across depths make resnet8a a shallower copy of resnet20a, so `--student-init` applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import init_weights, register_model


class PadShortcut(nn.Module):
    """Option A: every other pixel, and the new channels zero-padded half before, half after."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BlockA(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetA(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BlockA(cin if j == 0 else cout, cout, 2 if i and j == 0 else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.linear = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _register(depth: int) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return ResNetA(depth, num_classes, in_channels)

    factory.__doc__ = f"ResNet-{depth}, option-A shortcuts (akamaster checkpoint names)"
    register_model(f"resnet{depth}a", input_shape=(3, 32, 32))(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth)
