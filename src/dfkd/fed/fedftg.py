"""FedFTG (Zhang et al., CVPR 2022): after averaging, the server fine-tunes the global model by
data-free distillation from the ensemble of the round's client models.

A conditional generator G(z, y) makes inputs. Each iteration it takes a step toward inputs
that the class-level ensemble, sum_k beta[y, k] client_k(x), classifies as y (fidelity) and on
which the global model and the clients disagree most (hard samples: the beta-weighted L1
distance of their logits, negated), plus the diversity term. That is one step on the ensemble,
as the paper writes its losses (the authors' code steps once per client, K times the cost).
Then the global model takes a few steps, on that batch (generated in train mode, as it was
mined; the authors' code switches the generator to eval mode here), toward the ensemble
sum_k beta[y, k] softmax(client_k(x)), where beta[y, k] is client k's share of class y. Labels
are drawn in proportion to the round's pooled label counts. BatchNorm statistics stay those of
the averaged model. Defaults follow the authors' code (ZhangLin-PKU/FedFTG): 10 iterations of
1 generator step and 5 global steps, batch 50.
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
    generator_steps: int = 1  # per iteration
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


def _labels_and_noise(counts: torch.Tensor, n: int, noise_dim: int, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels in proportion to the pooled label counts, and the noise that goes with them."""
    probs = counts.sum(0).float()
    y = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    return y, torch.randn(n, noise_dim, generator=gen)


def _generate(generator: Generator, z: torch.Tensor, y: torch.Tensor, classes: int):
    return generator(torch.cat([z, F.one_hot(y, classes).float()], 1))


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
    k = counts.shape[1]
    for _ in range(opts.iterations):
        y, z = _labels_and_noise(counts, opts.batch_size, opts.noise_dim, gen)
        w = beta[:, y].unsqueeze(-1)  # (K, N, 1): each client's share of each label
        model.requires_grad_(False)
        generator.train()
        for _ in range(opts.generator_steps):
            x = _generate(generator, z, y, k)
            t = torch.stack([c.net(x) for c in clients])  # (K, N, C)
            fidelity = F.cross_entropy((w * t).sum(0), y)
            hard = -(w.squeeze(-1) * (model.net(x) - t).abs().mean(-1)).sum(0).mean()
            g_loss = opts.fidelity_weight * fidelity + hard + \
                opts.diversity_weight * diversity_loss(z, x.flatten(1))
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
        with torch.no_grad():  # the authors' code distills the same batch for all student steps
            x = _generate(generator, z, y, k)  # in train mode, like the samples it just mined
            target = (w * torch.stack([F.softmax(c.net(x), 1) for c in clients])).sum(0)
        model.requires_grad_(True)
        for _ in range(opts.student_steps):
            s_loss = -(target * F.log_softmax(model.net(x), 1)).sum(1).mean()
            s_opt.zero_grad(set_to_none=True)
            s_loss.backward()
            s_opt.step()
    generator.eval()
    return {"generator_loss": float(g_loss.detach()), "distill_loss": float(s_loss.detach())}
