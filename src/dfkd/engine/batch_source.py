"""Where the student's batches come from, one source per kind of run, so that the engine's loop
has one shape: a transfer set that grows in rounds the schedule plans (transfer-set methods), a
fresh batch every step (online methods), or a finished set given with `--transfer-set`.

Every source answers the same questions: is a synthesis round due, make it, keep it, and the
next student batch. A source also knows what its checkpoint must hold (the set's parts) and
which of its samples the run's report pictures.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dfkd.blackbox.teacher import is_black_box
from dfkd.config import FIXED_STEPS_PER_ROUND, Budget, DistillConfig
from dfkd.engine.plan import (
    Costs,
    Plan,
    Planner,
    counted,
    measure_costs,
    proportional_steps,
    replan_steps_per_round,
)
from dfkd.engine.run_state import RunState
from dfkd.models.classifier import Classifier
from dfkd.synthesis.base import Batch
from dfkd.synthesis.transfer_set import TransferSet

PICTURED = 64  # samples of the newest batch kept for the run's samples.png


class BatchSource:
    """What every source answers; the defaults are those of a source without a set."""

    augment = "none"  # the augmentation of its batches (the engine relabels augmented ones)
    last_x: torch.Tensor | None = None  # the newest samples, for the run's samples.png

    def round_due(self, state: RunState) -> bool:
        """Whether a synthesis round is due before the next student step."""
        return False

    def make_round(self, student: Classifier, state: RunState) -> Batch:
        raise NotImplementedError  # only asked of a source whose rounds fall due

    def keep_round(self, batch: Batch, state: RunState) -> None:
        raise NotImplementedError

    def next_batch(self, student: Classifier, state: RunState, gen: torch.Generator,
                   batch_size: int) -> Batch:
        raise NotImplementedError

    def plan(self, cfg: DistillConfig, budget: Budget, teacher: Classifier,
             student: Classifier, state: RunState, say) -> None:
        """Fix the run's schedule and `say(line)` what it is (a source without rounds has
        none)."""

    @property
    def samples(self) -> int | None:
        """The transfer set's size (None: the source has no set)."""
        return None

    def checkpoint_parts(self) -> int:
        """The set's rounds the checkpoint must keep (0: none of the run's own)."""
        return 0

    def resume(self, parts: int) -> None:
        """Back to the checkpoint's state: the set as it stood (`parts` rounds)."""

    def start_fresh(self) -> None:
        """A run that starts over drops whatever a killed earlier start left behind."""

    def pictured_targets(self) -> torch.Tensor | None:
        return None


class StoredSet(BatchSource):
    """A finished transfer set: uniform minibatches, augmented (and then relabelled by the
    engine) when `--augment` asks."""

    def __init__(self, tset: TransferSet, augment: str):
        self.tset, self.augment = tset, augment

    def next_batch(self, student, state, gen, batch_size) -> Batch:
        state.set_passes += batch_size / len(self.tset)
        return self.tset.sample(batch_size, gen)

    @property
    def samples(self) -> int:
        return len(self.tset)


class GrowingSet(StoredSet):
    """A transfer-set method's rounds, appended to the run's set when the schedule says one is
    due; the student draws minibatches from everything kept so far."""

    def __init__(self, synth, root: Path, augment: str, autocast):
        super().__init__(TransferSet(root), augment)
        self.synth, self.root, self.autocast = synth, root, autocast
        self.limit = synth.sample_limit()  # a finished set stops synthesis
        self.schedule: Schedule | None = None
        self.first_round_flops = 0.0  # counted where the first round re-plans a step budget

    def plan(self, cfg, budget, teacher, student, state, say) -> None:
        planner = None  # a resumed run keeps its plan
        if not state.plan:
            plan, costs, planner = plan_schedule(cfg, budget, self.synth, teacher, student)
            state.plan, state.costs = plan.to_dict(), dict(vars(costs))
        self.schedule = Schedule(cfg, budget, self.synth, state, planner)
        self.say = say
        say(self.schedule.describe())

    def round_due(self, state: RunState) -> bool:
        return state.next_round <= state.step and \
            not (self.limit is not None and len(self.tset) >= self.limit)

    def make_round(self, student: Classifier, state: RunState) -> Batch:
        with self.autocast():
            if self.schedule.counts_first_round(state):
                self.first_round_flops, batch = counted(
                    lambda: self.synth.synthesize(student, state.rounds))
                return batch
            return self.synth.synthesize(student, state.rounds)

    def keep_round(self, batch: Batch, state: RunState) -> None:
        """Store the round and schedule the next; `state` already counts its synthesis time.
        The first round's measured cost re-plans the run."""
        self.tset.append(batch)
        self.last_x = batch["x"][:PICTURED].cpu()
        state.rounds += 1
        state.image_steps += len(batch["x"]) * self.schedule.plan.steps
        if self.schedule.planner and state.rounds == 1:
            spent = self.first_round_flops if self.schedule.unit == "flop" \
                else state.synthesis_seconds
            self.say(self.schedule.replan(spent / state.image_steps))
        state.next_round = state.step + self.schedule.steps_to_next_round(state.elapsed(),
                                                                          len(self.tset))

    def checkpoint_parts(self) -> int:
        return len(self.tset.parts)

    def resume(self, parts: int) -> None:
        self.tset = TransferSet.open(self.root, limit=parts)

    def start_fresh(self) -> None:
        if self.root.exists():  # parts of a run killed before its first checkpoint
            self.tset = TransferSet.open(self.root, limit=0)

    def pictured_targets(self) -> torch.Tensor | None:
        targets = self.tset.parts[-1]["classes"] if self.tset.parts else None
        return targets if targets is not None and (targets >= 0).all() else None


class OnlineBatches(BatchSource):
    """An online method: a fresh batch for every student step, its making timed as synthesis."""

    def __init__(self, synth, autocast):
        self.synth, self.autocast = synth, autocast

    def next_batch(self, student, state, gen, batch_size) -> Batch:
        t0 = time.perf_counter()
        with self.autocast():
            batch = self.synth.synthesize(student, state.step)
        state.synthesis_seconds += time.perf_counter() - t0
        self.last_x = batch["x"][:PICTURED].detach().cpu()
        return batch


def plan_schedule(cfg: DistillConfig, budget: Budget, synth, teacher: Classifier,
                  student: Classifier) -> tuple[Plan, Costs, Planner | None]:
    """The run's schedule before its first round, the costs it comes from, and the planner that
    plans it again from measured costs. `planned`: from the costs probed here (timed under a
    wall-clock budget, counted in FLOPs under a step budget, which keeps step budgets
    reproducible) and the method's options the user did not set. `fixed`: the method's own
    round, FIXED_STEPS_PER_ROUND student steps apart, never re-planned."""
    size_key, steps_key = synth.round_options
    batch, steps = getattr(synth.opts, size_key), getattr(synth.opts, steps_key)
    if cfg.schedule == "fixed" or is_black_box(teacher):  # no gradients to time on a black box
        spr = cfg.steps_per_round or FIXED_STEPS_PER_ROUND
        return Plan(batch, steps, spr, 0, 0, 0.0), Costs(0.0, 0.0, "none"), None
    timed = budget.seconds is not None
    costs = measure_costs(teacher, student, cfg.batch_size, timed=timed,
                          relabel=cfg.relabel == "teacher")
    total = budget.seconds if timed else \
        budget.steps * costs.student_step / (1 - cfg.synthesis_share)
    fixed = frozenset(k for k, name in (("batch_size", size_key), ("steps", steps_key))
                      if name in cfg.method_options)
    planner = Planner(total, teacher.spec.num_classes, batch, steps, fixed, cfg.steps_per_round,
                      cfg.synthesis_share)
    return planner.plan(costs), costs, planner


class Schedule:
    """When the next synthesis round is due. The plan's round size and steps are set on the
    method; a `planner` (a fresh planned run) plans them again once from the first round's
    measured cost, and under a planned wall-clock run the student steps to the next round are
    re-planned after each round from the costs measured so far. The proportional schedule gives
    each gap student steps in proportion to the set's size."""

    def __init__(self, cfg: DistillConfig, budget: Budget, synth, state: RunState,
                 planner: Planner | None):
        self.state, self.budget, self.synth, self.planner = state, budget, synth, planner
        self.unit = state.costs["unit"]  # "none": a fixed plan, nothing measured to re-plan by
        planned = cfg.schedule != "fixed" and cfg.steps_per_round is None and self.unit != "none"
        self.proportional = planned and cfg.schedule == "proportional"
        self.replan_steps = planned and budget.seconds is not None
        self.share = cfg.synthesis_share
        self._set(Plan(**state.plan))

    def _set(self, plan: Plan) -> None:
        self.plan = plan
        size_key, steps_key = self.synth.round_options
        setattr(self.synth.opts, size_key, plan.batch_size)
        setattr(self.synth.opts, steps_key, plan.steps)

    def counts_first_round(self, state: RunState) -> bool:
        """Whether the coming round's FLOPs are to be counted: the first of a step budget's
        planned run."""
        return self.planner is not None and self.unit == "flop" and state.rounds == 0

    def replan(self, inversion: float) -> str:
        """Plan again from the first round's measured cost per image and inversion step (the
        probe's student step kept); the probe's plan stays in the report. Returns the line
        that says so."""
        s = self.state
        s.first_plan = {**s.plan, "costs": dict(s.costs)}
        costs = Costs(inversion, s.costs["student_step"], self.unit)
        self._set(self.planner.plan(costs))
        s.plan, s.costs = self.plan.to_dict(), dict(vars(costs))
        return f"re-planned from the first round: {self.describe()}"

    def describe(self) -> str:
        if self.unit == "none":
            return (f"fixed schedule: rounds of {self.plan.batch_size} samples x {self.plan.steps} "
                    f"steps, {self.plan.steps_per_round} student steps apart")
        c = self.state.costs
        grows = " (their mean: they grow with the set)" if self.proportional else ""
        return (f"{self.plan.describe()}{grows}; costs ({self.unit}): {c['inversion']:.3g} per "
                f"image and inversion step, {c['student_step']:.3g} per student step")

    def steps_to_next_round(self, spent: float, samples: int) -> int:
        """Student steps from now (`spent` of the budget gone, `samples` in the set) to the next
        round."""
        s = self.state
        if not self.replan_steps:
            return proportional_steps(self.plan, s.rounds) if self.proportional \
                else self.plan.steps_per_round
        measured = Costs(s.synthesis_seconds / max(1, s.image_steps),
                         s.train_seconds / s.step if s.step else s.costs["student_step"])
        return replan_steps_per_round(self.plan, measured, self.budget.seconds - spent,
                                      s.synthesis_seconds, spent,
                                      samples if self.proportional else None, self.share)


def method_source(synth, out: Path, augment: str, autocast) -> BatchSource:
    """A method's batch source, by its family; `autocast()` is the context synthesis runs in."""
    if synth.family == "transfer_set":
        return GrowingSet(synth, out / "transfer_set", augment, autocast)
    return OnlineBatches(synth, autocast)
