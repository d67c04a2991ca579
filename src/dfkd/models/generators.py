"""DAFL/DCGAN-style generators mapping noise z to images in the teacher's input space."""

from __future__ import annotations

import torch
from torch import nn

from .registry import init_weights, register_model


def _conv_bn_lrelu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    ]


class Generator(nn.Module):
    """Project z to a (2*ngf, S/4, S/4) map, then upsample twice to S x S.

    The last layer is a non-affine BatchNorm (as in DAFL): images come out roughly
    standardized, matching the normalized inputs the teacher was trained on.
    """

    def __init__(self, nz: int = 100, channels: int = 3, ngf: int = 64, img_size: int = 32) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be divisible by 4, got {img_size}")
        self.init_size = img_size // 4
        self.ngf = ngf
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            *_conv_bn_lrelu(2 * ngf, 2 * ngf),
            nn.Upsample(scale_factor=2),
            *_conv_bn_lrelu(2 * ngf, ngf),
            nn.Conv2d(ngf, channels, 3, 1, 1, bias=False),  # the BN below removes any bias
            nn.BatchNorm2d(channels, affine=False),
        )
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        return self.body(x)


@register_model(kind="generator")
def generator_8(nz: int = 100, channels: int = 1, ngf: int = 64) -> nn.Module:
    return Generator(nz, channels, ngf, img_size=8)


@register_model(kind="generator")
def generator_28(nz: int = 100, channels: int = 1, ngf: int = 64) -> nn.Module:
    return Generator(nz, channels, ngf, img_size=28)


@register_model(kind="generator")
def generator_32(nz: int = 100, channels: int = 3, ngf: int = 64) -> nn.Module:
    return Generator(nz, channels, ngf, img_size=32)
