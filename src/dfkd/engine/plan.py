"""Plan a transfer-set run by cost, so that the schedule fits the teacher and the budget.

A fixed schedule (a round of `steps` inversion steps on `batch_size` samples every 200 student
steps) suits one teacher on one machine: with a ResNet on a CPU a single round can eat half the
budget while the student overfits the few samples it has. The planner instead divides the
budget by what things cost here:

- `Costs.inversion`: seconds per image per inversion step of the method (teacher forward and
  backward plus the method's own work), and `Costs.student_step`: seconds per student step
  (student forward and backward plus the teacher's relabelling of the batch);
- a share of the budget goes to synthesis (`SYNTHESIS_SHARE` unless `--synthesis-share` says
  otherwise), the rest to the student;
- inversion steps per sample are the method's own, cut (never below `MIN_STEPS`) only when the
  budget could not otherwise make `MIN_SAMPLES_PER_CLASS` samples per class: below that the
  student memorises its set, above it better samples pay more than more of them;
- samples per round are the method's own, cut (never below `MIN_BATCH`) so that the set grows
  over at least `MIN_ROUNDS` rounds and the student trains on it while it grows;
- student steps between rounds split the student's share evenly between the rounds, or
  (`--schedule proportional`) in proportion to the set's size at each gap, so that every round
  gets the same passes over the set: the student takes few steps while the set is small and the
  set grows ahead of it.

The probe times a plain inversion step (teacher forward and backward), which a method's own
step can cost several times over (a generator to train, a memory bank to contrast against, the
BatchNorm prior's hooks), so the first round's measured cost re-plans the whole schedule once:
round size, inversion steps and student steps between rounds. Under a wall-clock budget the
student steps to the next round are then re-planned after every round from what the run
measured, so they follow the real costs. Under a step budget
the costs are counted in floating-point operations (deterministic, so a step budget stays
reproducible and resumes exactly; the first round's are counted too) and the budget is whatever
the student's steps cost, divided by the student's share. Options the user set (`--set steps=...`,
`--set batch_size=...`, `--steps-per-round`) are kept as given.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from dfkd.accel import synchronize
from dfkd.config import SYNTHESIS_SHARE
from dfkd.losses import kd_loss

MIN_SAMPLES_PER_CLASS = 100  # the set the budget must reach before steps per sample are cut
MIN_STEPS = 20  # inversion steps per sample, at the least
MIN_ROUNDS = 10  # the set grows over at least this many rounds
MIN_BATCH = 32  # samples per round, at the least (and one per class)


@dataclass(frozen=True)
class Costs:
    inversion: float  # seconds (or FLOPs) per image per inversion step
    student_step: float  # seconds (or FLOPs) per student step, relabelling included if any
    unit: str = "s"  # "s" (timed) or "flop" (counted)


@dataclass(frozen=True)
class Plan:
    batch_size: int  # samples per round
    steps: int  # inversion steps per round
    steps_per_round: int  # student steps between rounds
    rounds: int  # rounds the budget affords
    samples: int  # samples the set reaches
    synthesis_share: float  # planned share of the budget spent synthesizing

    def describe(self) -> str:
        return (f"plan: {self.rounds} rounds of {self.batch_size} samples x {self.steps} "
                f"inversion steps ({self.samples} samples), {self.steps_per_round} student "
                f"steps between rounds, {100 * self.synthesis_share:.0f}% of the budget "
                "synthesizing")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Planner:
    """What a run's schedule is planned for, apart from the costs: planning again from costs
    measured later keeps the method's own round and the user's settings as they were given."""

    budget: float  # in the unit of the costs
    num_classes: int
    batch_size: int  # the method's own samples per round
    steps: int  # the method's own inversion steps per round
    fixed: frozenset[str] = frozenset()
    steps_per_round: int | None = None
    share: float = SYNTHESIS_SHARE

    def plan(self, costs: Costs) -> Plan:
        return plan_run(costs, self.budget, self.num_classes, batch_size=self.batch_size,
                        steps=self.steps, fixed=self.fixed, steps_per_round=self.steps_per_round,
                        share=self.share)


def plan_run(costs: Costs, budget: float, num_classes: int, *, batch_size: int, steps: int,
             fixed: frozenset[str] = frozenset(), steps_per_round: int | None = None,
             share: float = SYNTHESIS_SHARE) -> Plan:
    """The schedule for a run of `budget` (in the unit of `costs`) from nothing synthesized,
    `share` of it synthesizing. `batch_size` and `steps` are the method's own per round; names
    in `fixed` (batch_size, steps) are the user's and kept, as is a given `steps_per_round`."""
    synthesis = share * budget
    if "steps" not in fixed:
        afford = synthesis / (MIN_SAMPLES_PER_CLASS * num_classes * costs.inversion)
        steps = max(1, min(steps, max(MIN_STEPS, math.floor(afford))))
    samples = synthesis / (steps * costs.inversion)
    if "batch_size" not in fixed:
        least = min(batch_size, max(MIN_BATCH, num_classes))
        batch_size = max(least, min(batch_size, math.floor(samples / MIN_ROUNDS)))
    rounds = max(1, math.floor(samples / batch_size))
    if steps_per_round is None:
        student_steps = (budget - rounds * batch_size * steps * costs.inversion) \
            / costs.student_step
        steps_per_round = max(1, math.floor(student_steps / rounds))
    share = rounds * batch_size * steps * costs.inversion / budget
    return Plan(batch_size, steps, steps_per_round, rounds, rounds * batch_size, min(1.0, share))


def replan_steps_per_round(plan: Plan, costs: Costs, remaining: float, synthesized: float,
                           spent: float, samples: int | None = None,
                           share: float = SYNTHESIS_SHARE) -> int:
    """Student steps until the next round, from the costs measured so far: the rounds the
    remaining synthesis share still affords, and the student's share of the remaining budget
    split between them, evenly or, given the set's size now (`samples`), in proportion to the
    set's size at each gap ahead; `share` of the whole budget synthesizes. `synthesized` and
    `spent` are the seconds spent so far on synthesis and in all."""
    total = spent + remaining
    synthesis_left = max(0.0, share * total - synthesized)
    round_cost = plan.batch_size * plan.steps * costs.inversion
    rounds_left = max(1, math.floor(synthesis_left / round_cost))
    student_steps = max(0.0, remaining - rounds_left * round_cost) / costs.student_step
    if samples is None:
        return max(1, math.floor(student_steps / rounds_left))
    sizes_ahead = rounds_left * samples + plan.batch_size * rounds_left * (rounds_left - 1) / 2
    return max(1, math.floor(student_steps * samples / sizes_ahead))


def proportional_steps(plan: Plan, rounds_done: int) -> int:
    """The planned student steps after round `rounds_done` (of the plan's `rounds`) when they
    grow with the set: the plan's student steps split over its rounds in proportion to the
    set's size, for a step budget, whose costs are counted once and never re-measured."""
    return max(1, round(plan.steps_per_round * 2 * rounds_done / (plan.rounds + 1)))


def _student_step(student, teacher, x: torch.Tensor, relabel: bool) -> None:
    with torch.no_grad():
        target = teacher(x) if relabel else \
            torch.zeros(x.shape[0], teacher.spec.num_classes, device=x.device)
    kd_loss(student(x), target, 4.0).backward()


def inversion_step(teacher, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    teacher.net(teacher.normalize(x)).logsumexp(1).sum().backward()


def measure_costs(teacher, student, batch_size: int, *, timed: bool, relabel: bool = True,
                  probe_batch: int = 64) -> Costs:
    """What an inversion step per image and a student step of `batch_size` cost with these
    models on their device (with the teacher's relabelling of the batch unless `relabel` is
    off): timed (the median of three after a warm-up), or counted in FLOPs.
    The student is a copy in train mode, so the run's own student and RNG are untouched."""
    student = copy.deepcopy(student).train()
    device = teacher.mean.device
    rng_state = torch.get_rng_state()
    try:
        x_inv = torch.rand(probe_batch, *teacher.spec.shape, device=device)
        x_step = torch.rand(batch_size, *teacher.spec.shape, device=device)
        if timed:
            inv = _median_seconds(lambda: inversion_step(teacher, x_inv), device) / probe_batch
            step = _median_seconds(lambda: _student_step(student, teacher, x_step, relabel), device)
            return Costs(inv, step, "s")
        return Costs(count_flops(lambda: inversion_step(teacher, x_inv)) / probe_batch,
                     count_flops(lambda: _student_step(student, teacher, x_step, relabel)), "flop")
    finally:
        torch.set_rng_state(rng_state)


def _median_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def count_flops(fn) -> float:
    return counted(fn)[0]


def counted(fn):
    """The FLOPs `fn()` runs (at least 1) and what it returns."""
    with _FlopCount() as counter:
        result = fn()
    return float(max(1, counter.total)), result


class _FlopCount(TorchDispatchMode):
    """torch's FLOP formulas (matrix products, convolutions and their gradients) summed over
    the ops a call runs. torch's FlopCounterMode also tracks modules, with hooks that a
    method's own autograd.grad (Fast's meta-gradient) does not support."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out
