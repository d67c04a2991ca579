"""FedGen (Zhu et al., ICML 2021): a conditional generator of feature vectors, learnt on the
server from the clients' heads, broadcast as an inductive bias for local training.

The server never sees data. After aggregation it trains G(eps, y) -> feature so that each
client's head classifies G's output as y, every client weighted per class by its share of that
class's samples (a head that never saw class y says little about it), plus FedGen's diversity
term. Clients then add CE(head(G(eps, y)), y) on labels drawn from the federation's classes
(alpha) and KL(head(G(eps, y_batch)) || model(x)) (beta) to their loss; both weights decay
per round. Defaults follow the authors' MNIST configuration (zhuangdizhu/FedGen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.losses import soft_target_loss


@dataclass
class FedGenOptions:
    noise_dim: int = 32
    hidden: int = 256
    steps: int = 50  # generator steps per round (server)
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-2
    diversity_weight: float = 1.0
    alpha: float = 10.0  # clients: weight of CE on generated features, decayed 0.98 per round
    beta: float = 10.0  # clients: weight of the KL to the generated features' predictions
    decay: float = 0.98


class FeatureGenerator(nn.Module):
    """eps (uniform, as in the authors' code) and one-hot y -> a feature vector."""

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int = 32,
                 hidden: int = 256) -> None:
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.body = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden),
                                  nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, feature_dim))

    def forward(self, y: torch.Tensor, gen: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.rand(len(y), self.noise_dim, generator=gen).to(y.device)
        return self.body(torch.cat([eps, F.one_hot(y, self.num_classes).float()], 1)), eps


def diversity_loss(noise: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(-mean_ij ||eps_i - eps_j||^2 * |g_i - g_j|): small when different noise gives
    different outputs (mode collapse makes it 1)."""
    d_out = torch.cdist(out, out, p=1) / out.shape[1]
    d_eps = torch.cdist(noise, noise, p=2).pow(2) / noise.shape[1]
    return torch.exp(-(d_eps * d_out).mean())


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """(clients, classes) label counts -> per-class ensemble weights summing to 1 over clients."""
    counts = counts.float()
    return counts / counts.sum(0, keepdim=True).clamp_min(1e-6)


def train_generator(generator: FeatureGenerator, heads: list[nn.Module], counts: torch.Tensor,
                    opts: FedGenOptions, optimizer: torch.optim.Optimizer,
                    gen: torch.Generator) -> float:
    """`opts.steps` updates of G against the clients' heads (frozen); returns the last loss."""
    weights = class_weights(counts)
    classes = torch.nonzero(counts.sum(0) > 0).flatten()
    generator.train()
    loss = torch.tensor(0.0)
    for _ in range(opts.steps):
        y = classes[torch.randint(len(classes), (opts.batch_size,), generator=gen)]
        feats, eps = generator(y, gen)
        loss = opts.diversity_weight * diversity_loss(eps, feats)
        for k, head in enumerate(heads):
            ce = F.cross_entropy(head(feats), y, reduction="none")
            loss = loss + (weights[k, y] * ce).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    generator.eval()
    return float(loss.detach())


def regularizer(head: nn.Module, generator: FeatureGenerator, logits: torch.Tensor,
                y: torch.Tensor, classes: torch.Tensor, alpha: float, beta: float,
                gen: torch.Generator) -> torch.Tensor:
    """The client's extra loss: the generated features of the federation's classes must be
    classified as their class (alpha), and the model's predictions on its batch must agree
    with what its head says of generated features of the batch's labels (beta)."""
    with torch.no_grad():
        target = F.softmax(head(generator(y, gen)[0]), 1)
        sampled = classes[torch.randint(len(classes), (len(y),), generator=gen)].to(y.device)
        feats = generator(sampled, gen)[0]
    latent = soft_target_loss(logits, target, 1.0)
    teacher = F.cross_entropy(head(feats), sampled)
    return alpha * teacher + beta * latent
