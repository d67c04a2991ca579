"""Backdoor triggers: stamp one on [0,1] pixels, poison a training set with it, and measure the
attack success rate (ASR) of a model.

They make poisoned teachers to test defences with (`dfkd train-teacher --poison`) and measure
what a student inherited (`dfkd evaluate --trigger`, `dfkd distill --eval-trigger`). No data-free
method and no defence ever sees a trigger: evaluation only.

A trigger is written as a spec, `KIND` or `KIND:key=value,...`:
- `badnets` (Gu et al. 2017): a `size` x `size` black-and-white checkerboard patch pasted into the
  bottom-right corner, `margin` pixels from the edges.
- `blend` (Chen et al. 2017): the whole image mixed with a fixed pattern at opacity `alpha`,
  x' = (1 - alpha) x + alpha p. The paper's pattern is a cartoon image, which dfkd cannot download;
  p here is uniform noise drawn from `seed` (the paper's other blended key), one value per pixel
  and channel.
Both send an image to class `target`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dfkd.errors import DfkdError
from dfkd.options import build_options

KINDS = ("badnets", "blend")


@dataclass(frozen=True)
class Trigger:
    kind: str = "badnets"
    target: int = 0  # the attacker's class
    size: int = 3  # badnets: the patch's side in pixels
    margin: int = 1  # badnets: pixels between the patch and the bottom and right edges
    alpha: float = 0.2  # blend: the pattern's opacity
    seed: int = 0  # blend: the pattern's seed

    @classmethod
    def parse(cls, spec: str) -> Trigger:
        kind, _, rest = spec.strip().partition(":")
        if kind not in KINDS:
            raise DfkdError(f"unknown trigger '{kind}'; choose one of: {', '.join(KINDS)} "
                            "(e.g. badnets:target=0,size=3 or blend:alpha=0.2)")
        given = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key == "kind":
                raise DfkdError(f"trigger options are key=value after the kind, got '{item}'")
            given[key.strip()] = value.strip()
        trigger = dataclasses.replace(build_options(cls, given, f"trigger '{kind}'"), kind=kind)
        if trigger.target < 0 or trigger.size <= 0 or trigger.margin < 0 \
                or not 0 < trigger.alpha <= 1:
            raise DfkdError(f"trigger '{spec}': target and margin must be >= 0, size > 0 and "
                            "alpha in (0, 1]")
        return trigger

    def spec(self) -> str:
        """The spec that parses back to this trigger, with only the options its kind uses."""
        keys = ("target", "size", "margin") if self.kind == "badnets" else \
            ("target", "alpha", "seed")
        return f"{self.kind}:" + ",".join(f"{k}={getattr(self, k)}" for k in keys)

    def check(self, num_classes: int, shape: tuple[int, ...]) -> None:
        if self.target >= num_classes:
            raise DfkdError(f"trigger target {self.target} is not a class of a model with "
                            f"{num_classes}")
        if self.kind == "badnets" and self.size + self.margin > min(shape[-2:]):
            raise DfkdError(f"a {self.size}-pixel patch {self.margin} pixels from the edge does "
                            f"not fit a {shape[-2]}x{shape[-1]} image")

    def pattern(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, pattern) for images of `shape` (C, H, W): stamped = (1 - mask) x + mask p."""
        c, h, w = shape
        if self.kind == "badnets":
            mask = torch.zeros(1, h, w)
            top, left = h - self.margin - self.size, w - self.margin - self.size
            mask[:, top:top + self.size, left:left + self.size] = 1.0
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            checker = ((rows + cols) % 2 == 0).float()  # white in the patch's corners
            return mask.expand(c, h, w), checker.expand(c, h, w)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.full((c, h, w), self.alpha), torch.rand((c, h, w), generator=gen)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W, pixels in [0, 1]) with the trigger on every image."""
        mask, pattern = (t.to(x.device, x.dtype) for t in self.pattern(tuple(x.shape[1:])))
        return (1 - mask) * x + mask * pattern


def poisoned_indices(labels: torch.Tensor, trigger: Trigger, rate: float,
                     gen: torch.Generator) -> torch.Tensor:
    """Which training images carry the trigger (and the target's label): a `rate` share of the
    set, drawn from the images of other classes."""
    if not 0 < rate < 1:
        raise DfkdError(f"poison rate must be in (0, 1), got {rate}")
    others = torch.nonzero(labels != trigger.target).flatten()
    count = round(rate * len(labels))
    if count > len(others):
        raise DfkdError(f"poison rate {rate} asks for {count} images of other classes than "
                        f"{trigger.target}; the set has {len(others)}")
    return others[torch.randperm(len(others), generator=gen)[:count]].sort().values


def attack_success_rate(logits_of, x: torch.Tensor, y: torch.Tensor, trigger: Trigger) -> float:
    """The share of test images not of the target class that the trigger sends to it.
    `logits_of` maps a batch of [0,1] pixels to logits (e.g. evaluate.predict_logits bound to a
    model)."""
    keep = y != trigger.target
    if not keep.any():
        raise DfkdError("ASR needs test images of other classes than the trigger's target")
    pred = logits_of(trigger.stamp(x[keep])).argmax(1)
    return float((pred == trigger.target).float().mean())
