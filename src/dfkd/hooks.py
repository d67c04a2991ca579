"""Forward hooks by dotted module path, so any nn.Module works unmodified, and the layers they
are put on: the head, the BatchNorm layers, the output of each spatial stage."""

from __future__ import annotations

import contextlib
import copy
import difflib
from typing import TYPE_CHECKING

import torch
from torch import nn

from dfkd.errors import DfkdError, require_one_of

if TYPE_CHECKING:
    from dfkd.models.classifier import Classifier

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


def hookless_copy(net: nn.Module) -> nn.Module:
    """A deep copy of `net` without the forward hooks a method put on it (a BatchNorm prior
    would otherwise run, and collect, on every forward of the copy)."""
    net = copy.deepcopy(net)
    for m in net.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return net


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
        require_one_of("BatchNorm distance", distance, ("l2", "kl"))
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


class Tap(FeatureHook):
    """A FeatureHook that records only while switched on (the loss's own forward passes, not
    evaluation or synthesis, which would keep their activations alive) and keeps a copy, so an
    in-place op later in the forward (ReLU(inplace=True)) cannot change what it saw. The copy is
    differentiable: gradients reach the student through it."""

    def __init__(self, module: nn.Module, *, capture: str = "output"):
        super().__init__(module, capture=capture)
        self.on = False

    def _hook(self, module, inputs, output):
        if self.on:
            value = inputs[0] if self.capture == "input" else output
            if not isinstance(value, torch.Tensor):
                raise DfkdError(f"a hooked layer ({type(module).__name__}) gives "
                                f"{type(value).__name__}, not a tensor; name other layers")
            self.value = value.clone()


def stage_outputs(model: Classifier) -> list[str]:
    """Module paths that end each spatial resolution of a forward pass, shallow to deep.

    1x1 maps (global pooling) carry no spatial attention and are left out; so are BatchNorm
    outputs (in a pre-activation network the BN that reads a stage's output would otherwise end
    the stage: the group output itself is what ZSKT transfers); a container that returns its
    last child's tensor unchanged is named by that child (`stages.2`, not `stages`).
    """
    events: list[tuple[str, object]] = []
    handles = [m.register_forward_hook(lambda mod, i, out, name=name: events.append((name, out)))
               for name, m in model.net.named_modules() if name and not isinstance(m, BN_TYPES)]
    try:
        dummy_forward(model.net, model.spec.shape, model.mean.device)
    finally:
        for h in handles:
            h.remove()
    calls: dict[str, int] = {}
    for name, _ in events:
        calls[name] = calls.get(name, 0) + 1
    last: dict[tuple, tuple[int, str, torch.Tensor]] = {}  # size -> its last (position, path, out)
    for pos, (name, out) in enumerate(events):
        if not (isinstance(out, torch.Tensor) and out.ndim == 4) or calls[name] > 1:
            continue
        size = tuple(out.shape[-2:])
        prev = last.get(size)
        passed_up = prev is not None and prev[2] is out and prev[1].startswith(name + ".")
        if size != (1, 1) and not passed_up:
            last[size] = (pos, name, out)
    return [name for _, name, _ in sorted(last.values(), key=lambda v: v[0])]


def matched_layers(teacher: Classifier, student: Classifier, spec: str,
                   loss: str) -> list[tuple[str, str]]:
    """(teacher path, student path) pairs: named in `spec` (T1:S1,T2:S2) or found by stage."""
    if spec:
        pairs = []
        for item in spec.split(","):
            t, sep, s = item.strip().partition(":")
            if not sep or not t or not s:
                raise DfkdError(f"layers takes TEACHER_PATH:STUDENT_PATH pairs separated by "
                                f"commas, got '{item.strip()}'")
            get_module(teacher.net, t)  # one-line errors listing the candidates
            get_module(student.net, s)
            pairs.append((t, s))
        return pairs
    stages = {}
    for role, model in (("teacher", teacher), ("student", student)):
        stages[role] = stage_outputs(model)
        if not stages[role]:
            raise DfkdError(f"student loss '{loss}' matches 4-D feature maps (N,C,H,W), but the "
                            f"{role} ({model.arch}) has none; choose kd, l1 or crd, or name the "
                            "layers with --loss-set layers=TEACHER_PATH:STUDENT_PATH")
    k = min(len(stages["teacher"]), len(stages["student"]))
    return list(zip(stages["teacher"][-k:], stages["student"][-k:], strict=True))
