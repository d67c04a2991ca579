"""Backdoor defences for the student (`dfkd distill --defense`): a teacher with a backdoor hands
it to a data-free student, because synthetic samples reach the regions the trigger controls.

A defence (dfkd.student.defense_base.Defense) may change the student's batch, weigh its loss, add
to its gradients and cap its learning rate; none ever sees a trigger. `nc`, trigger reversal and
unlearning, is in dfkd.student.trigger_reversal. `abd`, here: Anti-Backdoor Data-free KD (Hong
et al., ICML 2023; the authors' code, illidanlab/ABD), in two parts:

- Shuffling vaccine (SV). Backdoor behaviour rests on few channels, so a copy of the teacher
  whose last convolutions read their input channels in a random order loses its clean accuracy
  but keeps its trigger response. A sample on which such copies (`copies` of them, their logits
  averaged) still agree with the teacher is suspect. The student's loss is its loss on the other
  samples minus `sv_weight` times its loss on the suspects: it learns the clean ones and moves
  away from the teacher on the suspects.
- Self-retrospection (SR). In the last `sr_share` of the budget every student step also
  unlearns a trigger surrogate: a universal perturbation delta, in the teacher's normalized input
  units, that most changes the teacher's output (`sr_steps` Adam steps at lr 0.1), after which
  the student is made to answer the same on x and on x + delta for a few rows of the batch
  (`sr_rows`). Its gradient with respect to the student's weights is the implicit hypergradient
  through delta (I-BAU's fixed-point method: 5 iterations of an inner gradient step of 0.1, an
  L2 penalty of 0.001 on delta, both divergences at `sr_temperature`), added to the gradient of
  the student's loss before the optimizer steps at `sr_lr`, annealed to 0 by the end.

Departures from the authors' code, each for a reason:
- SV acts in the student's loss, as in their variant for distillation from a fixed image set
  (`vanilla_kd_ood.py`), not in the synthesis loss of their CMI and ZSKT runs: so it plugs into
  every method, pixel inversion and generators alike, without touching any.
- The ascent on suspects stops where the student's loss on them reaches that of a uniform
  answer (`sv_bounded`; theirs has no bound): past it the student would not unlearn the
  teacher's answer but learn its opposite, which cost the first version of this defence most of
  its clean accuracy (BENCHMARKS.md, "Poisoned teachers").
- A stored transfer set's samples are judged once each, as stored (the run keeps their flags);
  an online method's batches are judged as they come. Theirs judge every augmented view, which
  here cost the student more than half of its steps.
- They shuffle the last 5 tensors named `conv`; here the last `layers` convolutions in
  registration order (any nn.Module), or, in a network without convolutions, its linear layers
  before the head.
- SR runs in the last share of one budgeted run, where they resume a finished run's checkpoint
  for 1-2 epochs (400-800 steps) at the same lr; SR patches at least one row (their 2% of a
  batch is no row below 50).
- The vaccine verification they ship switched off for CIFAR-10 (`pseudo_test_batches` 0) is not
  built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dfkd.config import DEFENSES
from dfkd.errors import DfkdError, require_one_of
from dfkd.hooks import head_path, hookless_copy
from dfkd.losses import kd_loss
from dfkd.models.classifier import Classifier
from dfkd.options import build_options
from dfkd.student.defense_base import Defense
from dfkd.student.trigger_reversal import ReversalOptions, TriggerReversal


@dataclass
class ABDOptions:
    copies: int = 3  # shuffled teachers averaged (the authors': 3)
    layers: int = 5  # last convolutions whose input channels are shuffled (the authors': 5)
    sv_weight: float = 0.1  # weight of the ascent on suspect samples (the authors': 0.1)
    sv_bounded: bool = True  # the ascent stops where the student is as far as a uniform answer
    sr_share: float = 0.1  # final share of the budget with self-retrospection
    sr_steps: int = 10  # Adam steps of the trigger surrogate per student step (theirs: 10, 20)
    sr_rows: float = 0.02  # share of a batch that gets delta in the consistency loss (theirs)
    sr_temperature: float = 20.0  # of the teacher's and the consistency KL (their CMI's T)
    sr_lr: float = 5e-4  # the student's learning rate as retrospection starts, cosine to 0 (theirs)


def shuffled_copy(teacher: Classifier, layers: int, gen: torch.Generator) -> Classifier:
    """A copy of the teacher whose last `layers` convolutions (else linear layers before the
    head) take their input channels in a random order; hooks are not copied."""
    net = hookless_copy(teacher.net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    if not convs:
        head = head_path(net, "abd shuffles the layers before the head")
        convs = [m for name, m in net.named_modules()
                 if isinstance(m, nn.Linear) and name != head]
    if not convs:
        raise DfkdError("abd shuffles the input channels of convolutions (or of linear layers "
                        "before the head); this teacher has none")
    with torch.no_grad():
        for m in convs[-layers:]:
            perm = torch.randperm(m.weight.shape[1], generator=gen).to(m.weight.device)
            m.weight.copy_(m.weight[:, perm])
    return Classifier(net, teacher.spec, teacher.arch).eval().requires_grad_(False)


class ABD(Defense):
    """The ABD defence of one run: its shuffled teachers and its counters."""

    name = "abd"
    weighs_loss = True  # its own student loss (the vaccine's)

    def __init__(self, opts: ABDOptions, teacher: Classifier, seed: int):
        if opts.copies < 1 or opts.layers < 1 or opts.sr_steps < 1:
            raise DfkdError("abd copies, layers and sr_steps must be >= 1")
        if opts.sv_weight < 0 or not 0 <= opts.sr_share <= 1 or not 0 < opts.sr_rows <= 1:
            raise DfkdError("abd needs sv_weight >= 0, sr_share in [0, 1] and sr_rows in (0, 1]")
        self.opts, self.teacher = opts, teacher
        gen = torch.Generator().manual_seed(seed)
        self.shuffled = [shuffled_copy(teacher, opts.layers, gen) for _ in range(opts.copies)]
        self.suspects = self.seen = self.sr_steps = 0
        self.flags = torch.zeros(0, dtype=torch.int8)  # a stored set's: 1 suspect, 0 not, -1 unseen

    @torch.no_grad()
    def suspect(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The samples on which the shuffled teachers still agree with the teacher."""
        mean = torch.stack([m(x).float() for m in self.shuffled]).mean(0)
        found = mean.argmax(1) == teacher_logits.argmax(1)
        self.suspects += int(found.sum())
        self.seen += len(found)
        return found

    def stored_suspects(self, batch: dict) -> torch.Tensor:
        """The suspect flags of a stored set's samples (by `index`), each judged once, as
        stored: a set's samples do not change, so the shuffled teachers need not see every view
        of them."""
        index = batch["index"].cpu()
        if int(index.max()) >= len(self.flags):
            grown = torch.full((int(index.max()) + 1,), -1, dtype=torch.int8)
            grown[:len(self.flags)] = self.flags
            self.flags = grown
        new = self.flags[index] < 0
        if new.any():
            rows = new.nonzero().squeeze(1)
            x = batch["x"][rows].float().to(self.teacher.mean.device)
            with torch.no_grad():
                found = self.suspect(x, self.teacher(x).float())
            self.flags[index[rows]] = found.cpu().to(torch.int8)
        return (self.flags[index] > 0)

    def student_loss(self, crit, student: Classifier, x: torch.Tensor,
                     teacher_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The student's loss on the clean samples minus sv_weight times it on the suspects."""
        if batch.get("index") is not None:
            suspects = self.stored_suspects(batch).to(x.device)
        else:
            suspects = self.suspect(x, teacher_logits)
        logits = student(x)
        clean = ~suspects
        loss = crit(logits[clean], teacher_logits[clean], {}) if clean.any() else logits.sum() * 0
        if suspects.any() and self.opts.sv_weight:
            away = crit(logits[suspects], teacher_logits[suspects], {})
            if self.opts.sv_bounded:  # no gradient once as far as knowing nothing
                uniform = torch.zeros_like(logits[suspects])
                away = torch.minimum(away, crit(uniform, teacher_logits[suspects], {}).detach())
            loss = loss - self.opts.sv_weight * away
        return loss

    def after_backward(self, student: Classifier, teacher: Classifier, x: torch.Tensor,
                       gen: torch.Generator, progress: float) -> None:
        if self.retrospecting(progress):
            self.retrospect(student, teacher, x, gen)

    def retrospecting(self, progress: float) -> bool:
        return progress >= 1 - self.opts.sr_share

    def set_lr(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """During self-retrospection the student steps at sr_lr, annealed to 0 by the end."""
        if not self.retrospecting(progress) or not self.opts.sr_share:
            return
        into = (progress - (1 - self.opts.sr_share)) / self.opts.sr_share
        for group in optimizer.param_groups:
            group["lr"] = min(group["lr"], self.opts.sr_lr * 0.5 * (1 + math.cos(math.pi * into)))

    def pixel_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels per unit of the teacher's normalized input (its std), shaped to broadcast over
        x: the surrogate lives in normalized units, as in the authors' code."""
        std = torch.tensor(self.teacher.spec.std, dtype=x.dtype, device=x.device)
        return std.view(1, -1, *([1] * (x.dim() - 2)))

    def trigger_surrogate(self, teacher: Classifier, x: torch.Tensor) -> torch.Tensor:
        """One perturbation for the whole batch that most changes the teacher's output, in
        normalized units."""
        t, scale = self.opts.sr_temperature, self.pixel_scale(x)
        with torch.no_grad():
            clean = teacher(x).float()
        delta = torch.zeros_like(x[:1], requires_grad=True)
        opt = torch.optim.Adam([delta], lr=0.1)
        for _ in range(self.opts.sr_steps):
            loss = -kd_loss(teacher(x + delta * scale).float(), clean, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return delta.detach()

    def retrospect(self, student: Classifier, teacher: Classifier, x: torch.Tensor,
                   gen: torch.Generator) -> None:
        """Add to the student's gradients the hypergradient of unlearning the teacher's trigger
        surrogate (I-BAU's fixed point, 5 iterations): call after the loss's backward."""
        delta = self.trigger_surrogate(teacher, x).requires_grad_(True)
        scale = self.pixel_scale(x)
        weights = [p for p in student.parameters() if p.requires_grad]
        t = self.opts.sr_temperature
        with torch.no_grad():
            clean = student(x).float()
        rows = torch.randperm(len(x), generator=gen)[:max(1, int(len(x) * self.opts.sr_rows))]

        def inner(d):
            return -kd_loss(student(x + d * scale).float(), clean, t) + 0.001 * d.pow(2).sum()

        def outer(d):
            patch = torch.zeros_like(x)
            patch[rows] = 1.0
            return kd_loss(student(x + patch * d * scale).float(), clean, t)

        grads = torch.autograd.grad(outer(delta), [delta, *weights], allow_unused=True)
        outer_delta, outer_weights = grads[0], grads[1:]
        mapped = delta - 0.1 * torch.autograd.grad(inner(delta), delta, create_graph=True)[0]
        v = torch.zeros_like(delta)
        for _ in range(5):
            v = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)[0] \
                + outer_delta
        implicit = torch.autograd.grad(mapped, weights, grad_outputs=v, allow_unused=True)
        for p, a, b in zip(weights, implicit, outer_weights, strict=True):
            extra = sum(g for g in (a, b) if g is not None)
            if isinstance(extra, torch.Tensor):
                p.grad = extra if p.grad is None else p.grad + extra
        self.sr_steps += 1

    def state_dict(self) -> dict:
        return {"suspects": self.suspects, "seen": self.seen, "sr_steps": self.sr_steps,
                "flags": self.flags.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.suspects, self.seen, self.sr_steps = state["suspects"], state["seen"], \
            state["sr_steps"]
        self.flags = state.get("flags", torch.zeros(0, dtype=torch.int8)).clone()

    def report(self) -> dict:
        return {"defense": self.name, "defense_options": vars(self.opts),
                "suspect_share": round(self.suspects / self.seen, 4) if self.seen else None,
                "retrospection_steps": self.sr_steps}


def create_defense(name: str, options: dict, teacher: Classifier, loss: str, update,
                   seed: int) -> Defense | None:
    """The run's backdoor defence, or None."""
    require_one_of("defense", name, DEFENSES)
    if name == "none":
        if options:
            raise DfkdError("--defense-set needs --defense abd or nc")
        return None
    if update is not None:
        raise DfkdError(f"--defense {name} takes the student's step; use it with --update plain")
    if name == "nc":
        return TriggerReversal(build_options(ReversalOptions, options, "defence 'nc'"), teacher)
    if loss not in ("kd", "l1"):
        raise DfkdError(f"--defense abd weighs the student's loss per sample, which kd and l1 "
                        f"allow; this run's loss is '{loss}' (set --loss kd)")
    return ABD(build_options(ABDOptions, options, "defence 'abd'"), teacher, seed)
