"""Batch augmentations for training on images held as tensors (no PIL round trips)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHOICES = ("none", "shift", "shift+flip")


def shift_flip(x: torch.Tensor, gen: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """Random translation by up to `shift` pixels (zero fill) and optional horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx, dy = torch.randint(0, 2 * shift + 1, (2, n), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out[mask] = out[mask].flip(3)
    return out


def default_shift(height: int) -> int:
    """1 pixel for 8x8 inputs, 2 for 28-32 pixels, ~1/16 of the side in general."""
    return max(1, height // 16)


def apply(name: str, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if name == "none":
        return x
    return shift_flip(x, gen, default_shift(x.shape[2]), flip=name == "shift+flip")
