"""How the student's weights move on a fresh batch of an online method (`dfkd distill --update`).

- `plain`: one optimizer step on the student loss of the batch.
- `lra`: Learning to Retain while Acquiring (Patel et al., CVPR 2023). A generator that keeps
  changing makes the student forget what it learned from its earlier states. LRA keeps a replay
  memory of past samples and trains the student so that a step on the new batch does not hurt
  them: a virtual SGD step on the new batch (the inner step, differentiable), the loss on a
  replay batch at the virtually updated weights (the outer loss, second order through the inner
  step), plus the loss on the new and replay batches together at the current weights. The real
  optimizer then steps on that sum. While the memory is empty the update is plain.

The memory is a ring of at most `memory` batches (the paper: 10), each the first `keep` fraction
of one fresh batch (the paper: an eighth), with the teacher's logits stored beside it (the
teacher is fixed, so they equal a new pass); a batch is pushed every `every` student steps and
the oldest one leaves. One stored batch, drawn with the run's RNG, is the replay batch of a
step. The paper pushes every 5 epochs of 36k images; at CPU budgets of a few thousand steps,
`every=50` spans the last 500 steps. Its inner SGD has momentum and weight decay, which on a
single step from a fresh optimizer reduce to plain `w - inner_lr * g` (weight decay 5e-4
dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from dfkd.config import UPDATES
from dfkd.errors import DfkdError, require_one_of
from dfkd.models.classifier import Classifier
from dfkd.options import build_options
from dfkd.student.losses import StudentLoss
from dfkd.synthesis import list_methods, method_class


@dataclass
class LRAOptions:
    memory: int = 10  # replay batches kept (paper: 10); the oldest leaves first
    keep: float = 0.125  # fraction of a fresh batch stored (paper: batch_size // 8)
    every: int = 50  # student steps between pushes (paper: every 5 epochs; CPU scale here)
    inner_lr: float = 0.1  # the virtual SGD step's learning rate (paper: 0.9 with SGD lr 0.1)


class LRA:
    """LRA (Patel et al., CVPR 2023): replay memory of past batches, meta step on the new one.

    The replay memory and the meta-learned student loss of one run."""

    name = "lra"

    def __init__(self, opts: LRAOptions):
        if opts.memory < 1 or opts.every < 1:
            raise DfkdError(f"lra memory and every must be >= 1, got {opts.memory}, {opts.every}")
        if not 0 < opts.keep <= 1:
            raise DfkdError(f"lra keep must be in (0, 1], got {opts.keep}")
        if opts.inner_lr <= 0:
            raise DfkdError(f"lra inner_lr must be > 0, got {opts.inner_lr}")
        self.opts = opts
        self.memory: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pushed = 0  # batches pushed so far (the ring's write position)
        self.teacher_passes = 0  # extra teacher passes for losses that read teacher features

    def loss(self, crit: StudentLoss, student: Classifier, teacher: Classifier, x: torch.Tensor,
             t_logits: torch.Tensor, gen: torch.Generator, step: int) -> torch.Tensor:
        """The student loss of this step on the fresh batch (x, t_logits); remembers the batch
        every `every` steps."""
        if not self.memory:
            loss = self._loss_on(crit, student, teacher, x, t_logits, gen)
        else:
            pick = int(torch.randint(len(self.memory), (1,), generator=gen))
            mx, mt = (v.to(x.device) for v in self.memory[pick])
            params = dict(student.named_parameters())
            inner = self._loss_on(crit, student, teacher, x, t_logits, gen)
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True,
                                        allow_unused=True)
            moved = {n: p if g is None else p - self.opts.inner_lr * g
                     for (n, p), g in zip(params.items(), grads, strict=True)}
            outer = self._loss_on(crit, student, teacher, mx, mt, gen, moved)
            both = self._loss_on(crit, student, teacher, torch.cat([x, mx]),
                                 torch.cat([t_logits, mt]), gen)
            loss = outer + both
        if (step + 1) % self.opts.every == 0:
            self._push(x, t_logits)
        return loss

    def _loss_on(self, crit, student, teacher, x, t_logits, gen, params=None) -> torch.Tensor:
        if crit.needs_teacher:  # teacher features on exactly this batch
            with torch.no_grad(), crit.capture("teacher"):
                teacher(x)
            self.teacher_passes += x.shape[0]
        with crit.capture("student"):
            logits = student(x) if params is None else functional_call(student, params, (x,))
        return crit(logits, t_logits, {}, gen=gen)

    def _push(self, x: torch.Tensor, t_logits: torch.Tensor) -> None:
        n = max(1, int(x.shape[0] * self.opts.keep))
        item = (x[:n].detach().cpu().clone(), t_logits[:n].detach().cpu().clone())
        if len(self.memory) < self.opts.memory:
            self.memory.append(item)
        else:
            self.memory[self.pushed % self.opts.memory] = item
        self.pushed += 1

    def state_dict(self) -> dict:
        return {"memory": list(self.memory), "pushed": self.pushed,
                "teacher_passes": self.teacher_passes}

    def load_state_dict(self, state: dict) -> None:
        self.memory = list(state["memory"])
        self.pushed = state["pushed"]
        self.teacher_passes = state["teacher_passes"]

    def report(self) -> dict:
        return {"student_update": self.name, "student_update_options": vars(self.opts),
                "replay_samples": sum(len(x) for x, _ in self.memory)}


def online_methods() -> str:
    """The data-free online methods, from the registry: those `--update lra` can apply to."""
    return ", ".join(n for n in list_methods() if method_class(n).family == "online")


def create_update(name: str, options: dict, family: str, loss: str = "kd") -> LRA | None:
    """The run's student-update strategy for a method of `family` whose student loss is `loss`;
    None is the plain optimizer step."""
    require_one_of("student update", name, UPDATES)
    if name == "plain":
        if options:
            raise DfkdError("--update-set needs --update lra; the plain update has no options")
        return None
    if family != "online":
        raise DfkdError(f"--update lra trains on the fresh batches of an online method "
                        f"({online_methods()}); transfer-set methods already replay everything "
                        "they synthesized")
    if loss == "ce":
        raise DfkdError("--update lra replays batches with their teacher targets, but this run's "
                        "student learns true labels (loss ce: the scratch_real anchor); leave "
                        "--update plain")
    return LRA(build_options(LRAOptions, options, "student update 'lra'"))
