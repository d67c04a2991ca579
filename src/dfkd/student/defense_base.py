"""What a backdoor defence is to the distillation loop (`dfkd distill --defense`).

The loop calls every hook at its point of every student step; a defence overrides the ones it
needs and inherits the rest as no-ops, so the loop need not ask which ones a defence has.
"""

from __future__ import annotations

import torch

from dfkd.models.classifier import Classifier


class Defense:
    """The hooks of one run's defence; none ever sees a trigger."""

    name = ""
    weighs_loss = False  # True: the loop takes the student's loss from `student_loss`

    def set_lr(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        """Cap the student's learning rate before the step (`progress` in [0, 1])."""

    def inputs(self, x: torch.Tensor, progress: float, gen: torch.Generator) -> torch.Tensor:
        """The batch the student learns from; the teacher's answers stay those on `x`."""
        return x

    def student_loss(self, crit, student: Classifier, x: torch.Tensor,
                     teacher_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The student's loss, where `weighs_loss`."""
        raise NotImplementedError(f"defence '{self.name}' does not weigh the student's loss")

    def after_backward(self, student: Classifier, teacher: Classifier, x: torch.Tensor,
                       gen: torch.Generator, progress: float) -> None:
        """Add to the student's gradients before the optimizer steps."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`."""

    def report(self) -> dict:
        """What report.json says of the defence."""
        return {"defense": self.name}
