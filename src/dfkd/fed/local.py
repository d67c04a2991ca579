"""A client's local training: plain SGD on its own data (FedAvg), with FedProx's proximal term,
FedGen's generated-feature regularizer, or FedD2S's distillation from the global head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.fed import fedd2s, fedgen
from dfkd.fed.model_parts import head_of
from dfkd.models.classifier import Classifier


@dataclass
class LocalOptions:
    steps: int = 20  # minibatch steps per round
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    prox_mu: float = 0.01  # FedProx's mu (used by fedprox only)


@dataclass
class FedGenTerm:
    """What a FedGen client needs from the server this round."""

    generator: fedgen.FeatureGenerator
    classes: torch.Tensor  # labels present in the federation
    alpha: float
    beta: float


@dataclass
class D2STerm:
    """What a FedD2S client needs from the server this round."""

    head: nn.Sequential  # the server's layers after the split
    split: int
    weight: float
    temperature: float


def local_train(model: Classifier, x: torch.Tensor, y: torch.Tensor, opts: LocalOptions,
                gen: torch.Generator, prox: bool = False, fedgen_term: FedGenTerm | None = None,
                d2s_term: D2STerm | None = None) -> dict:
    """Train `model` in place on pixels x and labels y; returns the mean loss."""
    anchor = [p.detach().clone() for p in model.parameters()] if prox else None
    optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum)
    head = head_of(model)
    if d2s_term is not None:
        seq = fedd2s.layers(model)
        d2s_term.head.eval().requires_grad_(False)
    model.train()
    total = 0.0
    for _ in range(opts.steps):
        idx = torch.randint(len(x), (min(opts.batch_size, len(x)),), generator=gen)
        xb, yb = x[idx], y[idx]
        if d2s_term is None:
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        else:
            z = seq[:d2s_term.split](model.normalize(xb))
            logits = seq[d2s_term.split:](z)
            loss = F.cross_entropy(logits, yb) + d2s_term.weight * fedd2s.distill_loss(
                logits, d2s_term.head(z.detach()), d2s_term.temperature)
        if fedgen_term is not None:
            t = fedgen_term
            loss = loss + fedgen.regularizer(head, t.generator, logits, yb, t.classes, t.alpha,
                                             t.beta, gen)
        if anchor is not None:
            drift = sum((p - a).pow(2).sum()
                        for p, a in zip(model.parameters(), anchor, strict=True))
            loss = loss + opts.prox_mu / 2 * drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    model.eval()
    return {"loss": total / max(opts.steps, 1)}
