"""What federated code needs of any classifier: its head (the last linear layer, whose input is
the feature space FedGen's generator writes into) and the state a federation exchanges."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import get_module, head_path
from dfkd.models.classifier import Classifier


def head_of(model: Classifier) -> nn.Linear:
    """The last nn.Linear of the network: the classifier head, whose input is the feature
    space. It must be the network's final operation for head(features) to equal the logits."""
    return get_module(model.net, head_path(model.net, "FedGen needs a classifier head"))


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
