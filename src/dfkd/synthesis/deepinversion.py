"""DeepInversion and ADI (Yin et al., CVPR 2020): invert the teacher pixel by pixel.

Each round starts a batch from Gaussian noise in the teacher's normalized input space and
optimizes it with Adam on CE(T(x), y) + bn * BN(x) + tv * TV(x) + l2 * ||x||^2, with a random
jitter (roll) and horizontal flip every step. ADI adds comp * (1 - JS(p_T, p_S)), pulling the
batch toward inputs on which the current student disagrees with the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.data.augment import check_view, inversion_view, jitter_pixels
from dfkd.errors import DfkdError
from dfkd.hooks import bn_stats_hooks
from dfkd.losses import competition, total_variation
from dfkd.synthesis.base import (
    Options,
    Synthesizer,
    register_method,
    student_as_judge,
)


@dataclass
class DeepInversionOptions(Options):
    batch_size: int = 256  # images per round (paper, CIFAR: 256)
    steps: int = 200  # Adam steps per round. Paper: 2000 on a GPU; under a wall-clock budget on
    # a CPU more, shorter rounds give the better student (measured on digits), hence 200.
    lr: float = 0.1  # Adam learning rate on normalized pixels (paper: 0.05-0.1)
    bn_weight: float = 10.0  # a_bn, weight of the BatchNorm-statistics prior (paper: 10)
    first_bn_multiplier: float = 1.0  # extra weight on the first BN layer (NVlabs uses 10)
    tv_weight: float = 1e-3  # a_tv, total variation (L2) prior (paper: 1e-3 with its scaling)
    l2_weight: float = 0.0  # a_l2, squared-norm prior on the normalized image
    comp_weight: float = 0.0  # a_c, ADI competition term; 0 = plain DeepInversion
    comp_temperature: float = 3.0  # temperature of the JS divergence in the competition term
    jitter: int = -1  # max random shift in pixels each step; -1: 1/16 of the side (2 for 32 px,
    # as the paper uses on CIFAR; 1 for 8 px)
    view: str = "roll"  # the input's view each step: roll (the paper's jitter) | affine (each
    # sample rotated, scaled and shifted on its own) | crop (each shifted over a black border,
    # flipped on its own) | none
    flip: str = "auto"  # random horizontal flip each step: true | false | auto (on, except for
    # teachers of digits, mnist and svhn, whose classes are not mirror-symmetric)


MIRROR_SENSITIVE = {"digits", "mnist", "svhn"}


def flip_choice(value: str, dataset: str | None) -> bool:
    value = str(value).lower()
    if value == "auto":
        return dataset not in MIRROR_SENSITIVE
    if value in ("true", "false"):
        return value == "true"
    raise DfkdError(f"flip must be true, false or auto, got '{value}'")


class DeepInversionBase(Synthesizer):
    family = "transfer_set"
    Options = DeepInversionOptions
    temperature = 4.0

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        self.bn_hooks = bn_stats_hooks(teacher.net, self.name) if options.bn_weight > 0 else []
        self.jitter = jitter_pixels(options.jitter, teacher.spec.shape[1])
        self.flip = flip_choice(options.flip, teacher.spec.dataset)
        check_view(options.view)
        self.black = teacher.normalize(torch.zeros(1, device=self.device))

    def synthesize(self, student, index):
        o = self.opts
        gen, y, z, opt = self.noise_start(index, o.batch_size, o.lr)
        judge = student if o.comp_weight > 0 else None
        with student_as_judge(judge):
            self.invert(z, opt, o.steps, lambda: self._step_loss(z, y, judge, gen), o.batch_size)
        return self.inverted_batch(index, z, y)

    def _step_loss(self, z, y, judge, gen) -> torch.Tensor:
        o = self.opts
        x = inversion_view(z, o.view, self.jitter, gen, self.black, self.flip)
        logits = self.teacher.net(x)
        loss = F.cross_entropy(logits, y)
        if self.bn_hooks:
            losses = [h.loss for h in self.bn_hooks]
            loss = loss + o.bn_weight * (o.first_bn_multiplier * losses[0] + sum(losses[1:]))
        if o.tv_weight:
            loss = loss + o.tv_weight * total_variation(x, p=2)
        if o.l2_weight:
            loss = loss + o.l2_weight * x.pow(2).flatten(1).sum(1).mean()
        if judge is not None:
            loss = loss + o.comp_weight * competition(logits, judge.net(x), o.comp_temperature)
        return loss


@register_method
class DeepInversion(DeepInversionBase):
    """DeepInversion: optimize noise to match the teacher's BatchNorm statistics and classes."""

    name = "deepinv"


@register_method
class ADI(DeepInversionBase):
    """ADI: DeepInversion plus a competition term toward samples the student gets wrong."""

    name = "adi"

    @dataclass
    class Options(DeepInversionOptions):
        comp_weight: float = 10.0
