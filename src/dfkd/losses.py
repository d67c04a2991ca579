"""Losses shared by methods: KD, L1 on logits, attention transfer, feature affinity, the NCE of
contrastive distillation, Jensen-Shannon, image priors. Pure functions of tensors: the student
losses that hold state (hooks, CRD's heads and memory) are in student/losses.py."""

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


def logit_l1_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean |z_T - z_S| over batch and classes (DFAD): raw logits, no temperature, so the student
    also learns the teacher's logit scale and gets no vanishing gradient on confident samples."""
    return (student_logits.float() - teacher_logits.float()).abs().mean()


def attention_map(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Spatial attention of (N,C,H,W) features (Zagoruyko & Komodakis, ICLR 2017): the channel
    mean of squared activations, resized to `size` if given (bilinear, antialiased), flattened
    and L2-normalized per sample, so maps of layers with different widths compare."""
    q = features.float().pow(2).mean(1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.interpolate(q, size=tuple(size), mode="bilinear", align_corners=False,
                          antialias=True)
    return F.normalize(q.flatten(1), dim=1)


def attention_transfer_loss(student_features: torch.Tensor,
                            teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions of the squared difference of the normalized attention maps
    (the scale ZSKT's weight 250 is set for); the student's map is brought to the teacher's
    spatial size when they differ."""
    size = teacher_features.shape[-2:]
    return (attention_map(student_features, size) - attention_map(teacher_features)).pow(2).mean()


def batch_affinity(features: torch.Tensor) -> torch.Tensor:
    """n x n cosine similarities between the samples of a batch (the Gram matrix of the
    L2-normalized flattened features): independent of the layer's width, so a student layer
    compares with a wider teacher layer without a projection."""
    f = F.normalize(features.float().flatten(1), dim=1)
    return f @ f.t()


def feature_affinity_loss(student_features: torch.Tensor,
                          teacher_features: torch.Tensor) -> torch.Tensor:
    """Feature affinity (FAQD): mean over the n x n entries of (A_S - A_T)^2."""
    return (batch_affinity(student_features) - batch_affinity(teacher_features)).pow(2).mean()


def fast_feature_affinity_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                               probes: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of feature_affinity_loss from k Gaussian probes Z (n x k).

    For z ~ N(0, I), E ||M z||^2 = ||M||_F^2; with M = A_S - A_T = F_S F_S^T - F_T F_T^T,
    M Z = F_S (F_S^T Z) - F_T (F_T^T Z) costs O(n d k) instead of O(n^2 d) and never forms an
    n x n matrix (the point of FAQD's fast approximation for large batches or wide layers).
    """
    fs = F.normalize(student_features.float().flatten(1), dim=1)
    ft = F.normalize(teacher_features.float().flatten(1), dim=1)
    z = probes.float()
    residual = fs @ (fs.t() @ z) - ft @ (ft.t() @ z)
    n, k = z.shape
    return residual.pow(2).sum() / (k * n * n)


def nce_loss(probs: torch.Tensor, noise_prob: float, eps: float = 1e-7) -> torch.Tensor:
    """Noise-contrastive estimation as in CRD (Tian et al., ICLR 2020).

    `probs` (n, 1 + K): the model's probability that each memory entry is the anchor's pair,
    column 0 the true pair, the K others drawn from the noise distribution (probability
    `noise_prob` each). With h(p) = p / (p + K * noise_prob) the posterior that an entry came
    from the data, the loss is -mean over anchors of [log h(pos) + sum log(1 - h(neg))].
    """
    m = (probs.shape[1] - 1) * noise_prob
    pos = torch.log(probs[:, 0] / (probs[:, 0] + m + eps))
    neg = torch.log(m / (probs[:, 1:] + m + eps)).sum(1)
    return -(pos + neg).mean()


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


def competition(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """ADI's competition term, 1 - JS(p_T, p_S): low where the student disagrees with the
    teacher, so minimizing it moves synthesized inputs to where the student still has to learn."""
    return 1.0 - js_divergence(teacher_logits, student_logits, temperature)


def total_variation(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Smoothness prior on images: mean |neighbour difference|^p over both axes (p = 1 or 2)."""
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    if p == 1:
        return dh.abs().mean() + dw.abs().mean()
    return dh.pow(2).mean() + dw.pow(2).mean()
