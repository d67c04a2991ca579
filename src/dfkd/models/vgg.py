"""VGG with BatchNorm for 32x32 inputs; global average pooling feeds a single `fc` head."""

from __future__ import annotations

import torch
from torch import nn

from .registry import init_weights, register_model

# Channel counts of conv3x3-BN-ReLU layers; "M" is a 2x2 max-pool.
_CFGS: dict[str, list[int | str]] = {
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(cin, v, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model(input_shape=(3, 32, 32))
def vgg8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return VGG(_CFGS["vgg8"], num_classes, in_channels)


@register_model(input_shape=(3, 32, 32))
def vgg11(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return VGG(_CFGS["vgg11"], num_classes, in_channels)
