"""Batch augmentations for training on images held as tensors (no PIL round trips)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHOICES = ("none", "shift", "shift+flip")
FLIP_DATASETS = {"cifar10", "cifar100", "folder"}  # natural images: mirror images stay in class


def shift_flip(x: torch.Tensor, gen: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """Random translation by up to `shift` pixels (zero fill) and optional horizontal flip.

    One gather for the whole batch: every sample gets its own offset without a Python loop.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx, dy = torch.randint(0, 2 * shift + 1, (2, n, 1, 1, 1), generator=gen)
    rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(n, c, h, w)
    cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(n, c, h, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
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
