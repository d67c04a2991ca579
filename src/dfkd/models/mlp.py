"""Multi-layer perceptrons with BatchNorm1d: the flat-vector teachers users bring.

`mlp_W1_W2_..._Wk` is k hidden layers of those widths (Linear without bias, BatchNorm1d,
ReLU), then the `fc` head; `mlp` and `mlp_half` are two named sizes. The input image is
flattened, so the first layer's width follows the input shape the model is built for (MNIST's
1x28x28 by default; `--input-shape` for others).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dfkd.errors import DfkdError

from .registry import init_weights, register_family, register_model

MNIST_SHAPE = (1, 28, 28)


class MLP(nn.Module):
    def __init__(self, hidden: tuple[int, ...], num_classes: int = 10,
                 input_shape: tuple[int, int, int] = MNIST_SHAPE) -> None:
        super().__init__()
        if not hidden or any(w < 1 for w in hidden):
            raise DfkdError(f"an MLP needs one or more positive hidden widths, got {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        cin = math.prod(input_shape)
        for width in hidden:
            layers += [nn.Linear(cin, width, bias=False), nn.BatchNorm1d(width),
                       nn.ReLU(inplace=True)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _factory(hidden: tuple[int, ...]):
    def factory(num_classes: int = 10, in_channels: int = 1,
                input_shape: tuple[int, int, int] = MNIST_SHAPE) -> nn.Module:
        return MLP(hidden, num_classes, (in_channels, *input_shape[1:]))

    factory.__doc__ = f"MLP, hidden widths {'-'.join(map(str, hidden))}, BatchNorm1d"
    return factory


register_model("mlp", input_shape=MNIST_SHAPE)(_factory((512, 256)))
register_model("mlp_half", input_shape=MNIST_SHAPE)(_factory((256, 128)))


def _widths(match) -> tuple[int, ...]:
    return tuple(int(w) for w in match.group(1).split("_")[1:])


register_family("mlp_W1_W2_..._Wk", r"mlp((?:_\d+)+)", lambda m: _factory(_widths(m)),
                input_shape=MNIST_SHAPE)
