"""The two halves federated distillation needs of any classifier: its body up to the last
linear layer (the feature space FedGen's generator writes into) and that layer (the head)."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.teacher import Classifier


def head_of(model: Classifier) -> nn.Linear:
    """The last nn.Linear of the network: the classifier head, whose input is the feature
    space. It must be the network's final operation for head(features) to equal the logits."""
    linears = [m for m in model.net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DfkdError(f"model '{model.arch}' has no nn.Linear head; FedGen needs one")
    return linears[-1]


def logits_and_features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of pixels x and the head's input, from one forward pass."""
    seen = []
    handle = head_of(model).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[-1]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a federation exchanges: every floating tensor of the state (parameters and
    BatchNorm statistics); integer counters stay local."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()
            if v.is_floating_point()}


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing = set(state_of(model)) - set(state)
    if missing:
        raise DfkdError(f"received weights lack {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
