"""Small CNNs for scikit-learn's 8x8 digits: a teacher and a quarter-width student."""

from __future__ import annotations

import torch
from torch import nn

from .registry import init_weights, register_model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Conv w, 2w at 8x8, pool, conv 4w at 4x4, then a 4w hidden layer; params scale ~w^2.

    Flattening (not global pooling) keeps where strokes are, which matters at 8x8.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width),
            nn.Flatten(),
            nn.Linear(4 * width * 4 * 4, 4 * width, bias=False),
            nn.BatchNorm1d(4 * width),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model(input_shape=(1, 8, 8))
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return DigitsCNN(num_classes, in_channels, width=32)


@register_model(input_shape=(1, 8, 8))
def digits_cnn_quarter(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return DigitsCNN(num_classes, in_channels, width=8)
