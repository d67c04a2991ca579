"""The student's optimizer and its learning-rate schedule, shared by every training loop."""

from __future__ import annotations

import math

import torch

from dfkd.errors import DfkdError


def make_optimizer(name: str, params, lr: float | None, weight_decay: float):
    """The student's optimizer. SGD at 0.1 is the default of every method: it beat Adam at 1e-3
    for every method measured, on mnist and digits (BENCHMARKS.md, "The student's recipe")."""
    if lr is not None and not lr > 0:
        raise DfkdError(f"--lr must be positive, got {lr}")
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr or 1e-3, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.1, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    raise DfkdError(f"unknown optimizer '{name}'; choose adam or sgd")


def cosine_lr(optimizer, base_lr: float, progress: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * progress))
