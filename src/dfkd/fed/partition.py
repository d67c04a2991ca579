"""Non-IID client splits: each class is divided among clients by Dirichlet(alpha) proportions.

Small alpha gives each client a few dominant classes (alpha=0.1: mostly one or two), the
setting where averaging client models breaks and data-free distillation is meant to help.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfkd.errors import DfkdError
from dfkd.report import distinct_colors, pyplot, save_figure


def dirichlet_split(labels: torch.Tensor, clients: int, alpha: float, seed: int,
                    min_size: int = 10, max_tries: int = 1000) -> list[torch.Tensor]:
    """Indices of each client's samples. Every class is cut by proportions drawn from
    Dirichlet(alpha) over the clients; draws are repeated (same seed stream) until every
    client holds at least `min_size` samples, so no client is empty."""
    if clients < 1 or alpha <= 0:
        raise DfkdError(f"need clients >= 1 and alpha > 0, got {clients} and {alpha}")
    labels = labels.cpu().numpy()
    if len(labels) < clients * min_size:
        raise DfkdError(f"{len(labels)} samples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        sizes = [sum(len(p) for p in part) for part in parts]
        if min(sizes) >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(part))).long() for part in parts]
    raise DfkdError(f"no Dirichlet({alpha}) split gave every one of {clients} clients "
                    f"{min_size} samples in {max_tries} draws; use fewer clients or a larger alpha")


def label_counts(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int
                 ) -> torch.Tensor:
    """(clients, classes) sample counts."""
    return torch.stack([torch.bincount(labels[p], minlength=num_classes) for p in parts])


def plot_label_counts(counts: torch.Tensor, path: Path, title: str = "") -> None:
    """Per-client label counts as a stacked bar chart (one colour per class)."""
    plt = pyplot()
    counts = counts.numpy()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(counts) + 2), 4))
    bottom = np.zeros(len(counts))
    for c, color in enumerate(distinct_colors(counts.shape[1])):
        ax.bar(range(len(counts)), counts[:, c], bottom=bottom, color=color, label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_xticks(range(len(counts)))
    ax.legend(title="class", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
