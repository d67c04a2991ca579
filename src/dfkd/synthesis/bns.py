"""Inversion by BatchNorm statistics alone: BNS (Haroush et al., CVPR 2020) and MixMix (Li et
al., 2021), the calibration sources of data-free quantization.

BNS starts a batch from Gaussian noise and optimizes it until every BatchNorm layer of the
teacher sees the mean and variance it stored in training, measured as the KL divergence between
the two Gaussians per channel ("The Knowledge Within"); there are no labels. MixMix inverts
several models at once (the teacher plus `extra_teachers`): each model's BatchNorm statistics
and its cross-entropy toward the drawn classes, averaged over the models (feature mixing), with
a random box of another sample pasted into each input at every step and the labels mixed by the
pasted area (data mixing), so no single model's quirks shape the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.data.augment import cut_mix, jitter_pixels, random_roll
from dfkd.errors import DfkdError
from dfkd.hooks import bn_stats_hooks
from dfkd.losses import total_variation
from dfkd.models.classifier import load_classifier
from dfkd.synthesis.base import Options, Synthesizer, register_method


@dataclass
class BNSOptions(Options):
    batch_size: int = 256  # images per round
    steps: int = 200  # Adam steps per round (as deepinv: shorter rounds suit a CPU budget)
    lr: float = 0.1  # Adam learning rate on normalized pixels
    tv_weight: float = 0.0  # total-variation prior (0: BNS as published, statistics only)
    jitter: int = -1  # random roll in pixels per step (-1: 1/16 of the side; 0: off)


@register_method
class BNS(Synthesizer):
    """BNS: noise optimized until the teacher's BatchNorm statistics match (KL), no labels."""

    name = "bns"
    family = "transfer_set"
    Options = BNSOptions
    temperature = 4.0

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        self.models = [teacher]
        self.hooks = [bn_stats_hooks(teacher.net, self.name, "kl")]
        self.jitter = jitter_pixels(options.jitter, teacher.spec.shape[1])

    def synthesize(self, student, index):
        o = self.opts
        gen, y, z, opt = self.noise_start(index, o.batch_size, o.lr)
        self.invert(z, opt, o.steps, lambda: self._step_loss(z, y, gen),
                    o.batch_size * len(self.models))
        return self.inverted_batch(index, z, self._targets(y))

    def _step_loss(self, z, y, gen) -> torch.Tensor:
        x = random_roll(z, self.jitter, gen)
        loss = self._loss(x, y, gen)
        if self.opts.tv_weight:
            loss = loss + self.opts.tv_weight * total_variation(x, p=2)
        return loss

    def _loss(self, x, y, gen) -> torch.Tensor:
        self.teacher.net(x)
        return sum(h.loss for h in self.hooks[0])

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, -1)  # BNS draws no classes


@dataclass
class MixMixOptions(BNSOptions):
    extra_teachers: str = ""  # comma-separated models inverted together with the teacher (run
    # directories, dfkd .safetensors files, or PATH@ARCH for weights that do not name their
    # architecture, e.g. a published checkpoint); none: feature mixing over the teacher alone
    ce_weight: float = 1.0  # weight of each model's cross-entropy toward the mixed labels
    mix_prob: float = 0.5  # share of steps whose batch is cut-mixed (data mixing)


@register_method
class MixMix(BNS):
    """MixMix: BN statistics and classes of several models at once, inputs and labels mixed."""

    name = "mixmix"
    Options = MixMixOptions

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        if not 0 <= options.mix_prob <= 1:
            raise DfkdError(f"mix_prob must be in [0, 1], got {options.mix_prob}")
        for path in filter(None, (p.strip() for p in options.extra_teachers.split(","))):
            model = _load_extra(path, teacher)
            self.models.append(model)
            self.hooks.append(bn_stats_hooks(model.net, f"{self.name} (extra teacher {path})",
                                             "kl"))

    def _loss(self, x, y, gen) -> torch.Tensor:
        o, t = self.opts, self.teacher
        k = t.spec.num_classes
        soft = F.one_hot(y, k).float()
        if torch.rand((), generator=gen, device=gen.device) < o.mix_prob:
            x, perm, share = cut_mix(x, gen)
            soft = (1 - share) * soft + share * soft[perm]
        pixels = t.denormalize(x)
        loss = 0.0
        for model, hooks in zip(self.models, self.hooks, strict=True):
            logits = model.net(x) if model is t else model(pixels)
            ce = F.cross_entropy(logits, soft)
            loss = loss + sum(h.loss for h in hooks) + o.ce_weight * ce
        return loss / len(self.models)

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def report(self) -> dict:
        return {**super().report(), "models_inverted": len(self.models)}


def _load_extra(entry: str, teacher):
    """`PATH`, or `PATH@ARCH` for weights saved without dfkd's metadata (a published
    checkpoint): those take the teacher's input shape and normalization, since they are
    inverted on the same inputs."""
    path, at, arch = entry.rpartition("@")
    if not at or "/" in arch:
        path, arch = entry, ""
    spec = teacher.spec
    inputs = {"input_shape": spec.shape, "mean": spec.mean, "std": spec.std} if arch else {}
    model = load_classifier(path, arch=arch or None, arch_hint=f"write it as {path}@ARCH in "
                            "extra_teachers (ARCH: a zoo model or package.module:factory)",
                            **inputs)
    model = model.to(teacher.mean.device).eval().requires_grad_(False)
    if tuple(model.spec.shape) != tuple(teacher.spec.shape) or (
            model.spec.num_classes != teacher.spec.num_classes):
        raise DfkdError(f"extra teacher '{entry}' takes {tuple(model.spec.shape)} inputs with "
                        f"{model.spec.num_classes} classes; the teacher takes "
                        f"{tuple(teacher.spec.shape)} with {teacher.spec.num_classes}")
    return model
