"""Forward hooks by dotted module path, so any nn.Module works unmodified."""

from __future__ import annotations

import contextlib
import difflib

import torch
from torch import nn

from dfkd.errors import DfkdError

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at `path` (as in named_modules); one-line error listing candidates."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5) or names[-8:]
    raise DfkdError(f"no module '{path}' in {type(model).__name__}; candidates: {', '.join(close)}")


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """`module` in eval mode for the block (BatchNorm uses, and never updates, its running
    statistics); its mode is restored afterwards, whatever happens inside."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def dummy_forward(net: nn.Module, shape: tuple[int, ...], device: torch.device) -> None:
    """One eval-mode forward pass of two zero inputs: what shape discovery by hooks runs."""
    with eval_mode(net):
        net(torch.zeros((2, *shape), device=device))


def head_path(net: nn.Module, why: str) -> str:
    """Path of the last nn.Linear: the classifier head of every zoo model and most others. A
    network without one is a one-line error that ends with `why` (what to do instead)."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise DfkdError(f"{type(net).__name__} has no nn.Linear; {why}")
    return names[-1]


class FeatureHook:
    """Keeps the input or output of one module from the last forward pass."""

    def __init__(self, module: nn.Module, *, capture: str = "output"):
        self.capture, self.value = capture, None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.value = inputs[0] if self.capture == "input" else output

    def remove(self):
        self.handle.remove()


class BNStatsHook:
    """Distance between a BatchNorm layer's running statistics and its current input batch.

    distance "l2": ||mean_batch - running_mean||_2 + ||var_batch - running_var||_2 (biased
    variance), the prior that DeepInversion, CMI, DFQ and Fast all match; "kl": the KL divergence
    KL(N(batch) || N(running)) per channel, averaged over channels (BNS, Haroush et al. 2020),
    which weighs a channel's mismatch by its own spread. Measured only when autograd is on:
    the teacher's no-grad passes (labelling, relabelling, evaluation) never read it, and they
    run on every student step of the generator methods. After one, `loss` is None.
    """

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, distance: str = "l2"):
        if distance not in ("l2", "kl"):
            raise DfkdError(f"BatchNorm distance must be l2 or kl, got '{distance}'")
        self.module, self.loss, self.muted, self.distance = module, None, False, distance
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.muted:  # a pass whose statistics nothing reads; `loss` keeps the last read one
            return
        if not torch.is_grad_enabled():
            self.loss = None
            return
        x = inputs[0].float()  # float32 statistics even under bf16 autocast (no-op in fp32)
        dims = [0] + list(range(2, x.ndim))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        rm, rv = module.running_mean.float(), module.running_var.float()
        if self.distance == "kl":
            self.loss = gaussian_kl(mean, var + module.eps, rm, rv + module.eps).mean()
        else:
            self.loss = torch.norm(mean - rm, 2) + torch.norm(var - rv, 2)

    def remove(self):
        self.handle.remove()


@contextlib.contextmanager
def muted(hooks: list[BNStatsHook]):
    """Passes inside compute no BatchNorm statistics (CMI's second, local-view pass)."""
    for h in hooks:
        h.muted = True
    try:
        yield
    finally:
        for h in hooks:
            h.muted = False


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]


def gaussian_kl(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor,
                var_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)), elementwise."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q).pow(2)) / var_q - 1)


def bn_stats_hooks(model: nn.Module, method: str, distance: str = "l2") -> list[BNStatsHook]:
    """Hooks on every BatchNorm of `model`; a clear error for teachers without BatchNorm."""
    layers = bn_layers(model)
    if not layers:
        raise DfkdError(f"method '{method}' matches BatchNorm statistics, but the teacher has no "
                        "BatchNorm layer with running statistics; choose a method without a BN "
                        "prior (e.g. noise) or set bn_weight=0")
    return [BNStatsHook(m, distance) for m in layers]
