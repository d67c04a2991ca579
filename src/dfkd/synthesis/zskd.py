"""ZSKD (Nayak et al., ICML 2019): Dirichlet "data impressions" in the teacher's softmax space.

The class similarity matrix C is the cosine similarity of the head's class weight vectors,
min-max normalized per class. For class k a soft target y ~ Dir(beta * c_k + 1e-4) is drawn,
with beta = 1.0 for the first half of each batch and 0.1 for the second (the paper's two
scales); the input is optimized from noise so that softmax(T(x)/20) matches y. Nothing forces
argmax y = k: the fraction that differs is reported as `label_mismatch`, the defect the core
method (`mvn`) was designed to remove.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.hooks import get_module, head_path
from dfkd.losses import soft_target_loss
from dfkd.synthesis.base import (
    CountsLabelMismatch,
    Options,
    Synthesizer,
    balanced_targets,
    register_method,
)


@dataclass
class ZSKDOptions(Options):
    batch_size: int = 100  # impressions per round (paper: 100)
    samples_per_class: int = 0  # impressions per class, then synthesis stops (paper, MNIST:
    # 2400, i.e. 24,000 in all; 0: the set grows for the whole budget)
    steps: int = 200  # Adam steps per round (paper: 1500; at a CPU budget 200 gives a far
    # better student: BENCHMARKS.md "The method zoo on digits")
    lr: float = 0.01  # Adam learning rate on normalized pixels (paper: 1e-3 on its scale)
    temperature: float = 20.0  # tau of the matching loss and of the student's KD (paper: 20)
    beta_high: float = 1.0  # Dirichlet scale for the first half of each batch (paper: 1.0)
    beta_low: float = 0.1  # ... and for the second half (paper: 0.1)


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """(K, K) cosine similarity of class weight vectors, each row min-max scaled to [0, 1]."""
    v = F.normalize(weight.detach().float(), dim=1)
    sim = v @ v.t()
    lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
    return (sim - lo) / (hi - lo).clamp(min=1e-12)


def sample_dirichlet(alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Dirichlet samples, stable for tiny concentrations (1e-4): Gamma(a) = Gamma(a + 1) *
    U^(1/a) is drawn in log space, where U^(1/a) would underflow to zero. The Gamma draw uses
    the global RNG (torch has no generator argument for it): callers seed it."""
    alpha = alpha.double()
    boosted = torch.distributions.Gamma(alpha + 1.0, torch.ones_like(alpha)).sample()
    u = torch.rand(alpha.shape, generator=gen, device=alpha.device, dtype=torch.float64)
    log_gamma = boosted.log() + u.clamp(min=1e-300).log() / alpha
    return torch.softmax(log_gamma, dim=-1).float()


@register_method
class ZSKD(CountsLabelMismatch, Synthesizer):
    """ZSKD (Nayak 2019): Dirichlet soft targets from class similarity, inputs matched to them."""

    name = "zskd"
    family = "transfer_set"
    Options = ZSKDOptions
    temperature = 20.0

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        if options.steps < 0 or options.batch_size < 2:
            raise DfkdError("zskd needs steps >= 0 and batch_size >= 2")
        head = get_module(teacher.net, head_path(teacher.net, "zskd reads class similarity "
                                                "from the classifier head's weights"))
        if head.out_features != teacher.spec.num_classes:
            raise DfkdError(f"zskd reads class weights from the last nn.Linear, which has "
                            f"{head.out_features} outputs for {teacher.spec.num_classes} classes")
        self.similarity = class_similarity(head.weight).to(self.device)

    def dirichlet_targets(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Probability vectors for classes y, drawn from the Dirichlet of each class's row of the
        class similarity (half the batch at beta_high, half at beta_low)."""
        o = self.opts
        half = len(y) // 2
        beta = torch.full((len(y), 1), o.beta_low, device=self.device)
        beta[:half] = o.beta_high
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(2**62, (), generator=gen, device=gen.device)))
            target = sample_dirichlet(beta * self.similarity[y] + 1e-4, gen)
        self.count_mismatch(target, y)
        return target

    def synthesize(self, student, index):
        o, t = self.opts, self.teacher
        gen = self.rng(index)
        y = balanced_targets(o.batch_size, t.spec.num_classes, gen)
        target = self.dirichlet_targets(y, gen)
        z = torch.randn((o.batch_size, *t.spec.shape), generator=gen, device=self.device)
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=o.lr)
        self.invert(z, opt, o.steps, lambda: soft_target_loss(t.net(z), target, o.temperature),
                    o.batch_size)
        return self.inverted_batch(index, z, y)
