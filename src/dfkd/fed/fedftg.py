"""FedFTG (Zhang et al., CVPR 2022): after averaging, the server fine-tunes the global model by
data-free distillation from the ensemble of the round's client models.

A conditional generator G(z, y) makes inputs. Each iteration it takes one step per client
toward inputs that the client classifies as y (fidelity) and on which the global model and that
client disagree most (hard samples: the negative L1 distance of their logits), plus the
diversity term; then the global model takes a few steps toward the class-level ensemble,
sum_k beta[y, k] softmax(client_k(x)), where beta[y, k] is client k's share of class y. Labels
are drawn in proportion to the round's pooled label counts. BatchNorm statistics stay those of
the averaged model. Defaults follow the authors' code
(ZhangLin-PKU/FedFTG): 10 iterations of 1 generator round and 5 global steps, batch 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.fed.fedgen import class_weights, diversity_loss
from dfkd.models.generators import Generator
from dfkd.teacher import Classifier


@dataclass
class FedFTGOptions:
    noise_dim: int = 100
    iterations: int = 10
    generator_steps: int = 1  # per client, per iteration
    student_steps: int = 5
    batch_size: int = 50
    generator_lr: float = 0.01
    lr: float = 0.01  # the global model's SGD
    fidelity_weight: float = 1.0
    diversity_weight: float = 1.0


def conditional_generator(model: Classifier, noise_dim: int) -> Generator:
    """The image generator of the online methods, conditioned by one-hot labels appended to z;
    its output is in the network's normalized input space."""
    c, h, _ = model.spec.shape
    return Generator(noise_dim + model.spec.num_classes, c, ngf=32, img_size=h)


def _sample(generator: Generator, counts: torch.Tensor, n: int, noise_dim: int,
            gen: torch.Generator):
    probs = counts.sum(0).float()
    y = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    z = torch.randn(n, noise_dim, generator=gen)
    k = counts.shape[1]
    return generator(torch.cat([z, F.one_hot(y, k).float()], 1)), y, z


def finetune_global(model: Classifier, clients: list[Classifier], counts: torch.Tensor,
                    generator: Generator, opts: FedFTGOptions, gen: torch.Generator) -> dict:
    """Fine-tune `model` in place from `clients` (frozen, eval mode); returns loss stats."""
    beta = class_weights(counts)  # (clients, classes)
    g_opt = torch.optim.Adam(generator.parameters(), lr=opts.generator_lr)
    s_opt = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=0.9)
    for c in clients:
        c.eval().requires_grad_(False)
    g_loss = s_loss = torch.tensor(0.0)
    model.eval()  # BatchNorm keeps the averaged statistics: synthetic batches would skew them
    for _ in range(opts.iterations):
        model.requires_grad_(False)
        generator.train()
        for _ in range(opts.generator_steps):
            for k, client in enumerate(clients):
                x, y, z = _sample(generator, counts, opts.batch_size, opts.noise_dim, gen)
                t = client.net(x)
                s = model.net(x)
                w = beta[k, y]
                hard = -(w * (s - t.detach()).abs().mean(1)).mean()
                fidelity = F.cross_entropy(t, y) * w.mean()
                g_loss = hard + opts.fidelity_weight * fidelity + \
                    opts.diversity_weight * diversity_loss(z, x.flatten(1)) / len(clients)
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
        generator.eval()
        model.requires_grad_(True)
        for _ in range(opts.student_steps):
            with torch.no_grad():
                x, y, _ = _sample(generator, counts, opts.batch_size, opts.noise_dim, gen)
                probs = torch.stack([F.softmax(c.net(x), 1) for c in clients])  # (K, N, C)
                target = (beta[:, y].unsqueeze(-1) * probs).sum(0)
            s_loss = -(target * F.log_softmax(model.net(x), 1)).sum(1).mean()
            s_opt.zero_grad(set_to_none=True)
            s_loss.backward()
            s_opt.step()
    return {"generator_loss": float(g_loss.detach()), "distill_loss": float(s_loss.detach())}
