"""FedD2S (Atapour et al. 2024): personalised federated learning by data-free mutual
distillation through a global head, with deep-to-shallow layer dropping.

Reconstructed from the paper's abstract and published summary (neither the full text nor code
was reachable), so the details below are dfkd's reading, not the authors' recipe:
- Every client keeps its own model; no weights are averaged.
- The model's layers run in sequence; a split point is the input of a weighted layer (conv or
  linear). The active split moves from the deepest (the classifier's input) one layer
  shallower every `drop_every` rounds: the deeper layers drop out of the federation and stay
  personal.
- Client -> server: after local training a client uploads, for a sample of its data, the
  representation at the active split, the label and its own soft labels. The server trains
  its global head (the layers after the split) with cross-entropy on the labels plus KL to the
  clients' soft labels. No public or synthetic dataset is involved.
- Server -> client: the head goes back to the clients, which add KL(head(representation) ||
  own prediction) to their cross-entropy, so the head's global view distils into their models.
  A round whose split the server has not trained yet runs without that term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import eval_mode
from dfkd.losses import soft_target_loss
from dfkd.models.classifier import Classifier

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class FedD2SOptions:
    drop_every: int = 5  # rounds at each split point, deepest first
    kd_weight: float = 1.0  # clients: weight of the KL to the global head
    temperature: float = 1.0
    upload: int = 256  # samples a client uploads per round
    server_steps: int = 50  # the head's SGD steps per round
    server_batch: int = 64
    server_lr: float = 0.01


def layers(model: Classifier) -> nn.Sequential:
    """The network as one sequence of layers: an nn.Sequential, or `features` (a Sequential)
    followed by `fc` (the zoo's small CNNs); a clear error otherwise. `checked_layers` also
    checks that the sequence computes what the model does."""
    net = model.net
    if isinstance(net, nn.Sequential):
        seq = net
    elif isinstance(getattr(net, "features", None), nn.Sequential) and \
            isinstance(getattr(net, "fc", None), nn.Module):
        seq = nn.Sequential(*net.features, net.fc)
    else:
        raise DfkdError(f"FedD2S needs a model whose layers run in sequence (an nn.Sequential, or "
                        f"`features` then `fc`); '{model.arch}' is neither")
    return seq


def checked_layers(model: Classifier) -> nn.Sequential:
    """`layers(model)`, run beside the model on a random input (once per run, on the server):
    a forward that is not fc(features(x)) cannot be split."""
    seq, net = layers(model), model.net
    x = torch.randn(2, *model.spec.shape)
    with torch.no_grad(), eval_mode(net):
        same = torch.allclose(seq(x), net(x), atol=1e-5)
    if not same:
        raise DfkdError(f"'{model.arch}' does not compute fc(features(x)); FedD2S cannot split it")
    return seq


def split_points(seq: nn.Sequential) -> list[int]:
    """Indices of the weighted layers after the first, deepest first: the head at split i is
    seq[i:], and its input is the representation after seq[:i]."""
    points = [i for i, m in enumerate(seq) if isinstance(m, _WEIGHTED)][1:]
    if not points:
        raise DfkdError("FedD2S needs at least two weighted (conv or linear) layers to split")
    return points[::-1]


def active_split(points: list[int], server_round: int, drop_every: int) -> int:
    return points[min((server_round - 1) // max(drop_every, 1), len(points) - 1)]


def distill_loss(logits: torch.Tensor, head_logits: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """KL(softmax(head/T) || softmax(logits/T)) * T^2, the head's side held fixed."""
    return soft_target_loss(logits, F.softmax(head_logits.detach() / temperature, 1),
                            temperature)


def train_head(head: nn.Sequential, z: torch.Tensor, y: torch.Tensor, soft: torch.Tensor,
               opts: FedD2SOptions, gen: torch.Generator) -> float:
    """Train the server's head on the pooled uploads: CE on labels + KL to clients' soft labels
    (at temperature T, scaled by T^2). Returns the last loss."""
    optimizer = torch.optim.SGD(head.parameters(), lr=opts.server_lr, momentum=0.9)
    head.train()
    loss = torch.tensor(0.0)
    for _ in range(opts.server_steps):
        idx = torch.randint(len(y), (min(opts.server_batch, len(y)),), generator=gen)
        logits = head(z[idx])
        loss = F.cross_entropy(logits, y[idx]) + soft_target_loss(logits, soft[idx],
                                                                   opts.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    return float(loss.detach())


def upload(model: Classifier, split: int, x: torch.Tensor, n: int, temperature: float,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random sample of at most n of the client's inputs: (representation at `split`, its
    index into x, the client's soft labels at temperature T)."""
    idx = torch.randperm(len(x), generator=gen)[:n]
    seq = layers(model)
    model.eval()
    with torch.no_grad():
        h = model.normalize(x[idx])
        z = seq[:split](h)
        soft = F.softmax(seq[split:](z) / temperature, 1)
    return z, idx, soft


def head_of_split(server_model: Classifier, split: int) -> nn.Sequential:
    """The server's head at `split`: its layers after the split (shared across splits, so a
    deeper head keeps training as the split moves shallower)."""
    return layers(server_model)[split:]
