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
1 generator step and 5 global steps, batch 50, and the global model's step as theirs (their
loss is the cross-entropy averaged over classes too, so their lr 0.1 without momentum moves it
as 0.001 with momentum 0.9 does here).

One addition, `bn_weight` (0 turns it off): a BatchNorm prior from each client's own running
statistics, which describe that client's data. Each client gets an equal share of the batch,
labelled from its own label counts, and the generator matches that share's feature statistics
to the client's (DeepInversion's loss, per client). At alpha 0.1 a client that holds two classes
calls almost anything one of them, so the ensemble alone accepts inputs far from any digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.fed.fedgen import class_weights, diversity_loss
from dfkd.hooks import BNStatsHook, bn_layers
from dfkd.models.classifier import Classifier
from dfkd.models.generators import Generator


@dataclass
class FedFTGOptions:
    noise_dim: int = 100
    iterations: int = 10
    generator_steps: int = 1  # per iteration
    student_steps: int = 5
    batch_size: int = 50
    generator_lr: float = 0.01
    lr: float = 0.001  # the global model's SGD (momentum 0.9)
    fidelity_weight: float = 1.0
    diversity_weight: float = 1.0
    bn_weight: float = 1.0  # per-client BatchNorm prior (not in the paper; see above)


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


def _labels_per_client(counts: torch.Tensor, n: int, noise_dim: int, gen: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """ceil(n / clients) labels from each client's own label counts, client after client."""
    share = -(-n // len(counts))
    probs = counts.float() / counts.sum(1, keepdim=True).clamp_min(1)
    y = torch.multinomial(probs, share, replacement=True, generator=gen).flatten()
    return y, torch.randn(len(y), noise_dim, generator=gen)


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
    prior = [[BNStatsHook(m) for m in bn_layers(c)] for c in clients] if opts.bn_weight else []
    try:
        for _ in range(opts.iterations):
            if prior:
                y, z = _labels_per_client(counts, opts.batch_size, opts.noise_dim, gen)
            else:
                y, z = _labels_and_noise(counts, opts.batch_size, opts.noise_dim, gen)
            g_loss = _generator_steps(generator, g_opt, model, clients, beta, prior, y, z, k,
                                      opts)
            with torch.no_grad():  # the authors' code distills this batch for all its steps
                x = _generate(generator, z, y, k)  # in train mode, like the samples just mined
                w = beta[:, y].unsqueeze(-1)
                target = (w * torch.stack([F.softmax(c.net(x), 1) for c in clients])).sum(0)
            model.requires_grad_(True)
            for _ in range(opts.student_steps):
                s_loss = -(target * F.log_softmax(model.net(x), 1)).sum(1).mean()
                s_opt.zero_grad(set_to_none=True)
                s_loss.backward()
                s_opt.step()
    finally:
        for h in (h for hooks in prior for h in hooks):
            h.remove()
    generator.eval()
    return {"generator_loss": float(g_loss.detach()), "distill_loss": float(s_loss.detach())}


def _generator_steps(generator: Generator, g_opt: torch.optim.Optimizer, model: Classifier,
                     clients: list[Classifier], beta: torch.Tensor,
                     prior: list[list[BNStatsHook]], y: torch.Tensor, z: torch.Tensor, k: int,
                     opts: FedFTGOptions) -> torch.Tensor:
    """Fidelity to the class-level ensemble, hard samples, diversity, and (with `prior`) each
    client's BatchNorm statistics on its share of the batch."""
    w = beta[:, y].unsqueeze(-1)  # (K, N, 1): each client's share of each label
    model.requires_grad_(False)
    generator.train()
    share = len(y) // len(clients)
    for _ in range(opts.generator_steps):
        x = _generate(generator, z, y, k)
        t = torch.stack([c.net(x) for c in clients])  # (K, N, C)
        fidelity = F.cross_entropy((w * t).sum(0), y)
        hard = -(w.squeeze(-1) * (model.net(x) - t).abs().mean(-1)).sum(0).mean()
        g_loss = opts.fidelity_weight * fidelity + hard + \
            opts.diversity_weight * diversity_loss(z, x.flatten(1))
        if prior:
            for i, c in enumerate(clients):  # the hooks keep the statistics of this pass
                c.net(x[i * share:(i + 1) * share])
            bn = sum(sum(h.loss for h in hooks) for hooks in prior) / len(clients)
            g_loss = g_loss + opts.bn_weight * bn
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
    return g_loss
