"""Personalised accuracy: a model scored on test data re-weighted to one client's label mix,
sum_c p_k(c) acc(c), the usual measure of personalised federated learning."""

from __future__ import annotations

import torch


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of predictions `pred` on each class (0 for a class absent from y)."""
    correct = torch.zeros(num_classes).index_add_(0, y, (pred == y).float())
    return correct / torch.bincount(y, minlength=num_classes).clamp_min(1)


def personal_accuracy(per_class: torch.Tensor, counts: torch.Tensor) -> float:
    """sum_c p(c) acc(c) for a client with label counts `counts`."""
    return float((counts.float() / counts.sum().clamp_min(1)) @ per_class)
