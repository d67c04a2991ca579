"""LeNet-5 with BatchNorm: the classic MNIST-scale teacher, and a half-width student."""

from __future__ import annotations

import torch
from torch import nn

from .registry import init_weights, register_model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 5, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 inputs; `widths` = (conv1, conv2, conv3, hidden)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int, int] = (6, 16, 120, 84),
    ) -> None:
        super().__init__()
        c1, c2, c3, hidden = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3),
            nn.Flatten(),
            nn.Linear(c3, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model(input_shape=(1, 32, 32))
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return LeNet5(num_classes, in_channels)


@register_model(input_shape=(1, 32, 32))
def lenet5_half(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return LeNet5(num_classes, in_channels, widths=(3, 8, 60, 42))
