"""The counters of one distillation run: what its checkpoint saves, its log and report read."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RunState:
    step: int = 0  # student steps taken
    synthesis_seconds: float = 0.0  # wall clock spent making batches (rounds or online)
    train_seconds: float = 0.0  # wall clock spent on student steps, relabelling included
    rounds: int = 0  # transfer-set rounds kept
    evals: int = 0  # intermediate evaluation points logged
    loss_sum: float = 0.0  # running sum of the student's loss since the last log record
    loss_n: int = 0
    relabel_passes: int = 0  # images the engine itself ran through the teacher
    next_round: int = 0  # the student step at which the next transfer-set round is due
    image_steps: int = 0  # images x inversion steps synthesized (the planner's cost unit)
    set_passes: float = 0.0  # student passes over the transfer set as it stood at each draw
    plan: dict = dataclasses.field(default_factory=dict)  # the schedule (dfkd.engine.plan.Plan)
    costs: dict = dataclasses.field(default_factory=dict)  # the costs it was planned from
    first_plan: dict = dataclasses.field(default_factory=dict)  # the probe's, where re-planned
    init_acc: float | None = None  # the student's accuracy before its first step
    init_evaluated: bool = False  # the starting student was evaluated (its acc may be None)

    def elapsed(self) -> float:
        """The budget's clock: synthesis and training; evaluation and checkpoints stop it."""
        return self.synthesis_seconds + self.train_seconds

    def record_loss(self, loss: float) -> None:
        self.step += 1
        self.loss_sum += loss
        self.loss_n += 1

    def take_mean_loss(self) -> float:
        """The mean loss since the last call, which starts a new window."""
        mean = self.loss_sum / self.loss_n
        self.loss_sum, self.loss_n = 0.0, 0
        return mean

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def update(self, saved: dict) -> None:
        """Restore counters from a checkpoint (keys of older checkpoints that are gone are
        ignored; counters they lack keep their start values)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in saved.items():
            if key in names:
                setattr(self, key, value)
