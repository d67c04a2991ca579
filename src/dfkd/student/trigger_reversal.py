"""Trigger reversal and unlearning, the `nc` defence (`dfkd distill --defense nc`): Neural
Cleanse (Wang et al., S&P 2019) moved into data-free KD.

A backdoor makes one class reachable by a far smaller change than any other: the trigger. So,
once, on a batch of the run's own samples (synthetic, never real data, never the trigger), for
every class the smallest trigger that sends the batch there is searched on the teacher, in two
shapes:
- `patch`: x' = (1 - m) x + m p, a mask m per pixel position (shared by the channels) and a
  pattern p; its size is the mask's mean (Neural Cleanse's L1 norm, per pixel);
- `blend`: x' = (1 - a) x + a p, one opacity a over the whole image; its size is a. A blended
  trigger covers every pixel at a low opacity, which no small mask can express.
Each class's size is the smallest reached while the teacher sends at least `success` of the
batch there. Per shape, a class whose size lies more than `threshold` median absolute
deviations (x 1.4826) below the median is a backdoor target (Neural Cleanse's anomaly index,
threshold 2). From then on a share `rows` of every student batch is stamped with a flagged
trigger and keeps the teacher's answer on the clean sample: the student learns that the trigger
changes nothing (Neural Cleanse's unlearning, 20% of the rows). No target found: nothing is
stamped, and the run is a plain one.

Departures from Neural Cleanse, each for a reason:
- The search runs on the run's synthetic samples, since there are no clean images; the blend
  shape is added for blended triggers.
- The deviation in the anomaly index counts as at least 5% of the median size: with sizes
  nearly equal, Neural Cleanse's index flags noise.
- Every class is searched at once, in one batched forward per step, with a fixed number of Adam
  steps, from a mask of 0.5 everywhere (reach the class first, then shrink: on synthetic samples a
  small first mask left classes unreached); the weight of the size term is adapted per class every
  10 steps (x1.5 up while the class is reached, down otherwise), as Neural Cleanse adapts its cost.
- The unlearning happens inside the distillation (the stamped rows of each batch), not as a
  fine-tuning of a finished model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError, require_one_of
from dfkd.hooks import hookless_copy
from dfkd.models.classifier import Classifier
from dfkd.student.defense_base import Defense

SHAPES = ("patch", "blend")


@dataclass
class ReversalOptions:
    start: float = 0.1  # share of the budget after which the triggers are searched
    samples: int = 64  # samples of the run's batch the search uses
    steps: int = 200  # Adam steps of the search (all classes at once)
    lr: float = 0.1  # of the search
    success: float = 0.95  # share of the batch a trigger must send to its class
    threshold: float = 2.0  # anomaly index that flags a class (Neural Cleanse's)
    rows: float = 0.2  # share of each batch stamped during unlearning (Neural Cleanse's)


@dataclass
class Reversed:
    """The smallest trigger found per class, in one shape: stamped = (1 - mask) x + mask p."""
    shape: str
    masks: torch.Tensor  # (K, 1, H, W) for a patch, (K, 1, 1, 1) for a blend
    patterns: torch.Tensor  # (K, C, H, W)
    sizes: torch.Tensor  # (K,): the mask's mean; inf where the class was never reached

    def stamp(self, x: torch.Tensor, cls: int, strength: float = 1.0) -> torch.Tensor:
        """x with class `cls`'s trigger, its mask scaled by `strength` (at most 1 per pixel)."""
        m = (self.masks[cls] * strength).clamp(max=1.0).to(x)
        return (1 - m) * x + m * self.patterns[cls].to(x)

    def anomaly(self) -> torch.Tensor:
        """Per class, how many deviations its size lies below the median (Neural Cleanse's
        anomaly index, one-sided: a large trigger is no backdoor). The deviation counts as at
        least 5% of the median, so that classes of nearly equal sizes flag none."""
        sizes = self.sizes.clamp(max=1.0)
        median = sizes.median()
        mad = 1.4826 * (sizes - median).abs().median()
        return (median - sizes) / torch.maximum(mad, 0.05 * median).clamp(min=1e-8)


def reverse(teacher: Classifier, x: torch.Tensor, shape: str, opts: ReversalOptions,
            mask_start: float = 0.5) -> Reversed:
    """Per class, the smallest trigger of `shape` that sends at least `opts.success` of x to it,
    searched from a mask of `mask_start` per pixel."""
    require_one_of("trigger shape", shape, SHAPES)
    k, (n, c, h, w) = teacher.spec.num_classes, x.shape
    mask_shape = (k, 1, h, w) if shape == "patch" else (k, 1, 1, 1)
    mask_raw = torch.full(mask_shape, math.log(mask_start / (1 - mask_start)), device=x.device,
                          requires_grad=True)
    pattern_raw = torch.zeros((k, c, h, w), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=opts.lr)
    weight = torch.ones(k, device=x.device)
    target = torch.arange(k, device=x.device).repeat_interleave(n)
    best = torch.full((k,), float("inf"))
    best_masks, best_patterns = torch.ones(mask_shape), torch.zeros((k, c, h, w))
    reached = torch.zeros(k, device=x.device)
    for step in range(1, opts.steps + 1):
        mask, pattern = torch.sigmoid(mask_raw), torch.sigmoid(pattern_raw)
        stamped = ((1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]).flatten(0, 1)
        logits = teacher(stamped).float()
        size = mask.flatten(1).mean(1)
        loss = F.cross_entropy(logits, target, reduction="none").view(k, n).mean(1) + \
            weight * size
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            hit = logits.argmax(1).eq(target).float().view(k, n).mean(1)
            better = (hit >= opts.success) & (size < best.to(size))
            for cls in better.nonzero().flatten().tolist():
                best[cls] = float(size[cls])
                best_masks[cls], best_patterns[cls] = mask[cls].cpu(), pattern[cls].cpu()
            reached += (hit >= opts.success).float()
            if step % 10 == 0:  # Neural Cleanse's cost adaptation, per class
                weight = torch.where(reached >= 5, weight * 1.5, weight / 1.5)
                reached.zero_()
    return Reversed(shape, best_masks, best_patterns, best)


class TriggerReversal(Defense):
    """The `nc` defence of one run: searches the teacher's triggers once, then stamps the
    flagged ones into a share of every student batch."""

    name = "nc"
    weighs_loss = False  # the student's own loss, on partly stamped batches

    def __init__(self, opts: ReversalOptions, teacher: Classifier):
        if not 0 <= opts.start < 1 or not 0 < opts.rows <= 1 or not 0 < opts.success <= 1 \
                or opts.samples < 1 or opts.steps < 10:
            raise DfkdError("nc needs start in [0, 1), rows and success in (0, 1], samples >= 1 "
                            "and steps >= 10")
        if len(teacher.spec.shape) != 3:
            raise DfkdError(f"nc searches image triggers; this teacher's input is "
                            f"{tuple(teacher.spec.shape)}, not (C, H, W)")
        self.opts = opts
        self.teacher = Classifier(hookless_copy(teacher.net), teacher.spec,
                                  teacher.arch).eval().requires_grad_(False)
        self.found: list[Reversed] | None = None  # None until searched
        self.stamped_rows = 0

    def flagged(self) -> list[tuple[Reversed, int]]:
        """(shape's triggers, class) for every class flagged as a backdoor target."""
        return [(r, cls) for r in self.found or []
                for cls in (r.anomaly() > self.opts.threshold).nonzero().flatten().tolist()
                if torch.isfinite(r.sizes[cls])]

    def search(self, x: torch.Tensor) -> None:
        x = x[:self.opts.samples].detach().float()
        with torch.enable_grad():
            self.found = [reverse(self.teacher, x, shape, self.opts) for shape in SHAPES]

    def inputs(self, x: torch.Tensor, progress: float, gen: torch.Generator) -> torch.Tensor:
        """The batch the student learns from: x with a share of its rows stamped with a flagged
        trigger (the teacher's answers stay those on x)."""
        if self.found is None:
            if progress < self.opts.start:
                return x
            self.search(x)
        targets = self.flagged()
        if not targets:
            return x
        n = max(1, int(len(x) * self.opts.rows))
        rows = torch.randperm(len(x), generator=gen)[:n]
        which = torch.randint(len(targets), (n,), generator=gen)
        plane = (1, *x.shape[2:])  # a blend's one opacity, spread over the image
        masks = torch.stack([r.masks[cls].expand(plane) for r, cls in targets]).to(x)[which]
        patterns = torch.stack([r.patterns[cls] for r, cls in targets]).to(x)[which]
        rows = rows.to(x.device)
        x = x.clone()
        x[rows] = (1 - masks) * x[rows] + masks * patterns  # Reversed.stamp, row by row
        self.stamped_rows += n
        return x

    def state_dict(self) -> dict:
        found = None if self.found is None else \
            [{"shape": r.shape, "masks": r.masks, "patterns": r.patterns, "sizes": r.sizes}
             for r in self.found]
        return {"found": found, "stamped_rows": self.stamped_rows}

    def load_state_dict(self, state: dict) -> None:
        self.found = None if state["found"] is None else [Reversed(**r) for r in state["found"]]
        self.stamped_rows = state["stamped_rows"]

    def report(self) -> dict:
        out = {"defense": self.name, "defense_options": vars(self.opts),
               "stamped_rows": self.stamped_rows, "triggers_found": None}
        if self.found is not None:
            out["triggers_found"] = [{"shape": r.shape, "class": cls,
                                      "size": round(float(r.sizes[cls]), 5)}
                                     for r, cls in self.flagged()]
            out["trigger_sizes"] = {r.shape: [round(float(s), 5) if math.isfinite(s) else None
                                              for s in r.sizes]
                                    for r in self.found}  # None: never reached
        return out
