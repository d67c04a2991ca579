"""Losses shared by methods: KD, Jensen-Shannon, image priors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """tau^2 * KL(p_T || p_S) at temperature tau (Hinton et al.), mean over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """tau^2 * KL(target || softmax(logits / tau)), mean over the batch: cross-entropy to given
    probabilities (ZSKD, MVN) minus their entropy, so a perfect match scores 0."""
    t = temperature
    log_p = F.log_softmax(logits.float() / t, dim=1)
    return F.kl_div(log_p, target.float(), reduction="batchmean") * t * t


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence between two categorical distributions, mean over the batch."""
    p = F.softmax(logits_a / temperature, dim=1)
    q = F.softmax(logits_b / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    return 0.5 * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean"))


def total_variation(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Smoothness prior on images: mean |neighbour difference|^p over both axes (p = 1 or 2)."""
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    if p == 1:
        return dh.abs().mean() + dw.abs().mean()
    return dh.pow(2).mean() + dw.pow(2).mean()
