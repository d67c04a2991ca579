"""An intermediate feature space of any teacher, and "the rest of the teacher" after it.

Soft-targeted synthesis samples vectors in a hidden layer and needs the teacher's output for
them. An `nn.Module` has no general "run from layer L on" method, so the rest is run by
substitution: a hook replaces the layer's value with the given vectors during an ordinary
forward pass of a dummy input. That works for any architecture whose later layers read the
modeled layer only (true for the default, the input of the classifier head; a layer inside a
residual block would let the skip path bypass the substitution). Layers are named by their
module path, as in `named_modules()`.
"""

from __future__ import annotations

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import BN_TYPES, dummy_forward, get_module, head_path

MAX_DIM = 4096  # a full covariance of a larger space costs more than it can be estimated from


class FeatureSpace:
    """The modeled layer of `net`: its flattened vectors, and the teacher's logits for any."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...], layer: str = ""):
        self.net = net
        self.head = head_path(net, "name the feature layer with --set layer=MODULE.PATH")
        # default: the input of the head; a named layer: that module's output
        self.layer = layer or self.head
        self.capture = "input" if not layer else "output"
        self.module = get_module(net, self.layer)
        self.input_shape = tuple(input_shape)
        self._replace: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        if self.capture == "input":
            self._handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = self.module.register_forward_hook(self._post_hook)
        dummy_forward(net, self.input_shape, self.device)
        self.shape = tuple(self.value.shape[1:])
        self.dim = int(torch.tensor(self.shape).prod())
        if self.dim > MAX_DIM:
            raise DfkdError(f"layer '{self.layer}' has {self.dim} features, too many for a full "
                            f"covariance (at most {MAX_DIM}); model a narrower layer such as the "
                            f"input of '{self.head}' (the default)")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def describes(self) -> str:
        return f"{self.capture} of '{self.layer}'"

    def _pre_hook(self, module, args):
        self.value = args[0]
        if self._replace is not None:
            return (self._replace.reshape(-1, *self.shape), *args[1:])
        return None

    def _post_hook(self, module, args, output):
        self.value = output
        if self._replace is not None:
            return self._replace.reshape(-1, *self.shape)
        return None

    def features(self) -> torch.Tensor:
        """The modeled layer's vectors (N, dim) from the last forward pass."""
        return self.value.flatten(1)

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        """Teacher logits for feature vectors h (N, dim): a forward pass of a dummy input with
        the modeled layer's value substituted. Differentiable in h."""
        self._replace = h
        try:
            return self.net(torch.zeros((h.shape[0], *self.input_shape), device=h.device))
        finally:
            self._replace = None

    def batchnorm_before(self) -> nn.Module | None:
        """The last BatchNorm before the modeled layer with one statistic per feature: its
        output, N(beta, gamma^2) per unit, is the layer's pre-activation in a plain stack; in a
        residual block the shortcut is added after it, so there it is not (BENCHMARKS.md, "mvn's
        class centres on residual teachers")."""
        found = None
        for _, m in self.net.named_modules():
            if m is self.module:
                break
            if isinstance(m, BN_TYPES) and m.num_features == self.dim and m.affine:
                found = m
        return found

    def weight_correlation(self) -> torch.Tensor:
        """Correlation of the space's units implied by the head's weights: cosine similarity of
        the head's weight columns for its input space (units that vote for the same classes
        co-vary), of its rows (class similarity, as in ZSKD) for the logit space."""
        head = get_module(self.net, self.head)
        if self.module is head and self.capture == "input":
            vectors = head.weight.detach().float().t()
        elif self.module is head and self.capture == "output":
            vectors = head.weight.detach().float()
        else:
            raise DfkdError(f"cov=weights needs the input or output of the head '{self.head}', "
                            f"not the {self.describes}; use cov=bn or cov=bootstrap")
        v = torch.nn.functional.normalize(vectors, dim=1)
        return v @ v.t()

    def remove(self) -> None:
        self._handle.remove()
