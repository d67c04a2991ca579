"""The planner: schedules from injected costs (no wall clock), re-planning, cost probes, and
the engine running on a plan (report keys, exact resume)."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.engine.plan import (
    MIN_BATCH,
    MIN_STEPS,
    Costs,
    Plan,
    Planner,
    count_flops,
    counted,
    inversion_step,
    measure_costs,
    plan_run,
    proportional_steps,
    replan_steps_per_round,
)
from dfkd.errors import DfkdError
from dfkd.io import read_jsonl
from dfkd.models.classifier import InputSpec, load_classifier, new_classifier

RESNET_ON_CPU = Costs(inversion=0.003, student_step=0.3)  # ResNet-20 -> resnet8a here, roughly
LENET_ON_CPU = Costs(inversion=1.5e-4, student_step=0.03)


def test_an_expensive_teacher_gets_fewer_steps_and_smaller_rounds():
    plan = plan_run(RESNET_ON_CPU, 600, 10, batch_size=256, steps=200)
    # 300 s of synthesis at 3 ms per image-step: 100 steps buy the 1,000 samples the set needs
    assert (plan.steps, plan.samples, plan.batch_size, plan.rounds) == (100, 1000, 100, 10)
    assert plan.steps_per_round == 100  # the other 300 s at 0.3 s per step, over 10 rounds
    assert plan.synthesis_share == pytest.approx(0.5)


def test_a_cheap_teacher_keeps_the_methods_round():
    plan = plan_run(LENET_ON_CPU, 300, 10, batch_size=256, steps=200)
    assert (plan.steps, plan.batch_size, plan.rounds) == (200, 256, 19)
    synth = 19 * 256 * 200 * 1.5e-4
    assert plan.steps_per_round == int((300 - synth) / 0.03 / 19)


def test_a_larger_synthesis_share_buys_more_samples_and_fewer_student_steps():
    half = plan_run(RESNET_ON_CPU, 600, 10, batch_size=100, steps=100)  # rounds of 30 s
    more = plan_run(RESNET_ON_CPU, 600, 10, batch_size=100, steps=100, share=0.7)
    assert (half.rounds, more.rounds) == (10, 14) and more.synthesis_share == pytest.approx(0.7)
    assert (half.steps_per_round, more.steps_per_round) == (100, 600 // 14)  # 180 s at 0.3 s
    assert Planner(600, 10, 100, 100, share=0.7).plan(RESNET_ON_CPU) == more
    # re-planned after the first round against the same share: 13 rounds of 30 s still due
    assert replan_steps_per_round(more, RESNET_ON_CPU, remaining=570, synthesized=30,
                                  spent=30, share=0.7) == 600 // 13


def test_floors_on_a_budget_too_small_for_anything():
    plan = plan_run(RESNET_ON_CPU, 3, 10, batch_size=256, steps=200)  # 25 samples at most
    assert plan.steps == MIN_STEPS and plan.batch_size == MIN_BATCH and plan.rounds == 1
    # never more than the method's own: a method of 10 steps and 16 samples keeps them
    small = plan_run(RESNET_ON_CPU, 10, 10, batch_size=16, steps=10)
    assert (small.steps, small.batch_size) == (10, 16)


def test_the_users_settings_are_kept():
    plan = plan_run(RESNET_ON_CPU, 600, 10, batch_size=256, steps=200,
                    fixed=frozenset({"steps", "batch_size"}), steps_per_round=7)
    assert (plan.steps, plan.batch_size, plan.steps_per_round) == (200, 256, 7)
    assert plan.rounds == 1  # 300 s buy 500 samples at 200 steps: less than one round of 256


def test_replanning_follows_the_measured_costs():
    plan = plan_run(RESNET_ON_CPU, 600, 10, batch_size=256, steps=200)
    as_planned = replan_steps_per_round(plan, RESNET_ON_CPU, remaining=540, synthesized=30,
                                        spent=60)
    assert as_planned == 100
    slower_student = Costs(0.003, 0.6)
    assert replan_steps_per_round(plan, slower_student, 540, 30, 60) == 50
    # synthesis ran over its share: one more round, the rest of the budget to the student
    over = replan_steps_per_round(plan, RESNET_ON_CPU, remaining=200, synthesized=390, spent=400)
    assert over == int((200 - 30) / 0.3)


def test_proportional_gaps_grow_with_the_set():
    """The proportional schedule splits the same student steps in proportion to the set's size
    at each gap: few while the set is small, so that it grows ahead of the student."""
    plan = plan_run(RESNET_ON_CPU, 600, 10, batch_size=256, steps=200)  # 10 rounds of 100
    # after the first round: 9 rounds and 900 student steps ahead, over sets of 100..900
    first = replan_steps_per_round(plan, RESNET_ON_CPU, 540, 30, 60, samples=100)
    assert first == 900 * 100 // (9 * 100 + 100 * 36) == 20
    # the last round left: everything to the student
    last = replan_steps_per_round(plan, RESNET_ON_CPU, 60, 270, 540, samples=900)
    assert last == replan_steps_per_round(plan, RESNET_ON_CPU, 60, 270, 540) == 100
    # a step budget's gaps (counted costs, never re-measured): k/(R+1) of twice the even gap,
    # the plan's student steps in all
    gaps = [proportional_steps(plan, k) for k in range(1, plan.rounds + 1)]
    assert gaps == [round(100 * 2 * k / 11) for k in range(1, 11)]
    assert abs(sum(gaps) - plan.rounds * plan.steps_per_round) <= plan.rounds


def test_a_method_dearer_than_the_probe_is_planned_again_from_its_first_round():
    """A generator method's step can cost several times the probe's plain inversion step: from
    the measured cost the same planner cuts the round, so the set still grows over 10 rounds."""
    planner = Planner(600, 10, batch_size=256, steps=20)
    probed = planner.plan(RESNET_ON_CPU)
    assert (probed.batch_size, probed.rounds) == (256, 19)  # 300 s / (20 x 3 ms) = 5,000 samples
    measured = planner.plan(Costs(5 * RESNET_ON_CPU.inversion, RESNET_ON_CPU.student_step))
    assert (measured.steps, measured.batch_size, measured.rounds) == (20, 100, 10)
    assert measured.synthesis_share == pytest.approx(0.5)
    kept = Planner(600, 10, 256, 20, fixed=frozenset({"batch_size"}), steps_per_round=9)
    assert kept.plan(Costs(0.015, 0.3)).batch_size == 256
    assert kept.plan(Costs(0.015, 0.3)).steps_per_round == 9


def _models():
    spec = InputSpec((1, 8, 8), (0.5,), (0.5,), 10)
    torch.manual_seed(0)
    return (new_classifier("digits_cnn", spec).eval().requires_grad_(False),
            new_classifier("digits_cnn_quarter", spec))


@pytest.mark.parametrize("arch", ["digits_cnn", "resnet8a"])
def test_flops_are_counted_as_torchs_flop_counter_counts_them(arch):
    """The engine's count (without FlopCounterMode's module tracker) gives FlopCounterMode's
    numbers, so the default's rule and step-budget plans keep their thresholds."""
    shape = (1, 8, 8) if arch == "digits_cnn" else (3, 32, 32)
    spec = InputSpec(shape, (0.5,) * shape[0], (0.5,) * shape[0], 10)
    teacher = new_classifier(arch, spec).eval().requires_grad_(False)
    x = torch.rand(2, *shape)
    reference = FlopCounterMode(display=False)
    with reference:
        inversion_step(teacher, x)
    assert counted(lambda: inversion_step(teacher, x))[0] == reference.get_total_flops() > 0


def test_counted_costs_are_deterministic_and_leave_the_run_untouched():
    teacher, student = _models()
    before = copy.deepcopy(student.state_dict())
    rng = torch.get_rng_state()
    a = measure_costs(teacher, student, 32, timed=False)
    b = measure_costs(teacher, student, 32, timed=False)
    assert a == b and a.unit == "flop" and a.inversion > 0 and a.student_step > a.inversion
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    # without the teacher's relabelling a step costs the student's part alone
    plain = measure_costs(teacher, student, 32, timed=False, relabel=False)
    forward = count_flops(lambda: teacher(torch.rand(32, *teacher.spec.shape)))
    assert plain.inversion == a.inversion and plain.student_step == a.student_step - forward
    timed = measure_costs(teacher, student, 32, timed=True)
    assert timed.unit == "s" and timed.inversion > 0 and timed.student_step > 0


def _cfg(teacher, out, **kw):
    base = dict(teacher=TeacherArgs(path=str(teacher)), method="deepinv",
                method_options={"batch_size": 8, "steps": 4}, student="digits_cnn_quarter",
                out=str(out), budget="30steps", device="cpu", eval_dataset="digits",
                eval_points=3, batch_size=32, checkpoint_seconds=0.0)
    base.update(kw)
    return DistillConfig(**base)


def _plan_of(report_plan: dict) -> Plan:
    return Plan(**{k: report_plan[k] for k in Plan.__dataclass_fields__})


def test_a_planned_run_reports_its_plan_and_what_happened(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "r"), progress=False)
    plan, probe = report["plan"], report["plan"]["from_probe"]
    assert plan["schedule"] == "planned" and plan["costs"]["unit"] == "flop"
    assert (plan["batch_size"], plan["steps"]) == (8, 4)  # set by the user, kept
    assert report["synthesis_rounds"] > 1 and report["samples"] == 8 * report["synthesis_rounds"]
    assert report["passes_over_set"] > 0 and report["steps"] == 30
    # the probe's plan, then the same planner from the first round's counted cost (the
    # probe's student step kept: the budget is in its FLOPs)
    budget = 30 * probe["costs"]["student_step"] / 0.5
    planner = Planner(budget, 10, 8, 4, fixed=frozenset({"batch_size", "steps"}))
    assert _plan_of(probe) == planner.plan(Costs(**probe["costs"]))
    assert _plan_of(plan) == planner.plan(Costs(**plan["costs"]))
    assert plan["costs"]["student_step"] == probe["costs"]["student_step"]
    assert plan["costs"]["inversion"] != probe["costs"]["inversion"]
    # the same command plans the same run: step budgets stay reproducible
    again = distill(_cfg(digits_teacher, tmp_path / "again"), progress=False)
    assert again["plan"] == plan and again["student_acc"] == report["student_acc"]


def test_a_step_budget_planned_with_a_larger_synthesis_share(digits_teacher, tmp_path):
    """The student's steps stay the budget; the share sets what synthesis may count beside
    them, so the same steps are planned with more rounds."""
    half = distill(_cfg(digits_teacher, tmp_path / "half", budget="60steps"), progress=False)
    more = distill(_cfg(digits_teacher, tmp_path / "more", budget="60steps",
                        synthesis_share=0.8), progress=False)
    plan, probe = more["plan"], more["plan"]["from_probe"]
    budget = 60 * probe["costs"]["student_step"] / (1 - 0.8)
    planner = Planner(budget, 10, 8, 4, fixed=frozenset({"batch_size", "steps"}), share=0.8)
    assert _plan_of(plan) == planner.plan(Costs(**plan["costs"]))
    assert more["steps"] == half["steps"] == 60
    assert plan["rounds"] > half["plan"]["rounds"]


def test_the_fixed_schedule_and_a_given_steps_per_round(digits_teacher, tmp_path):
    fixed = distill(_cfg(digits_teacher, tmp_path / "f", schedule="fixed"), progress=False)
    assert fixed["plan"]["steps_per_round"] == 200 and fixed["synthesis_rounds"] == 1
    given = distill(_cfg(digits_teacher, tmp_path / "g", steps_per_round=10), progress=False)
    assert given["plan"]["steps_per_round"] == 10 and given["synthesis_rounds"] == 3
    with pytest.raises(DfkdError, match="unknown schedule 'soon'; choose one of: planned, "
                       "proportional, fixed"):
        distill(_cfg(digits_teacher, tmp_path / "bad", schedule="soon"), progress=False)
    with pytest.raises(DfkdError, match="share must be a number between 0 and 1, not '0'"):
        distill(_cfg(digits_teacher, tmp_path / "bad", synthesis_share=0), progress=False)


def test_the_planner_cuts_a_methods_own_round_for_the_budget(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "own", method_options={}), progress=False)
    assert report["plan"]["steps"] < 200 and report["plan"]["batch_size"] < 256
    assert report["method_options"]["steps"] == report["plan"]["steps"]
    assert report["method_options"]["batch_size"] == report["plan"]["batch_size"]


def test_a_generator_methods_rounds_are_planned_from_what_its_first_round_cost(digits_teacher,
                                                                               tmp_path):
    """cmi's step trains a generator and contrasts against a memory bank besides inverting the
    teacher: its first round counts several times the probe's cost per image and step, and the
    rounds after it are smaller than the probe planned, so that the set grows in more rounds."""
    report = distill(_cfg(digits_teacher, tmp_path / "cmi", method="cmi", budget="200steps",
                          method_options={"steps": 3}), progress=False)
    plan, probe = report["plan"], report["plan"]["from_probe"]
    assert plan["costs"]["inversion"] > 2 * probe["costs"]["inversion"]
    assert plan["batch_size"] < probe["batch_size"] and plan["steps"] == 3
    assert report["method_options"]["batch_size"] == plan["batch_size"]
    later = report["samples"] - probe["batch_size"]  # every round after the first
    assert report["synthesis_rounds"] > 2 and later == plan["batch_size"] * (
        report["synthesis_rounds"] - 1)


def test_a_planned_wall_clock_run_replans_between_rounds(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "w", budget="6s",
                          method_options={"batch_size": 16, "steps": 5}), progress=False)
    assert report["plan"]["costs"]["unit"] == "s" and report["synthesis_rounds"] >= 2
    assert load_classifier(tmp_path / "w").arch == "digits_cnn_quarter"


def test_the_proportional_schedule_grows_the_set_ahead_of_the_student(digits_teacher, tmp_path):
    """Same plan, same student steps: the proportional schedule's set is larger at every
    evaluation before the last, and the run stays reproducible under a step budget."""
    def run(name, **kw):
        report = distill(_cfg(digits_teacher, tmp_path / name, budget="60steps",
                              method_options={"batch_size": 32, "steps": 2}, eval_points=4,
                              **kw), progress=False)
        evals = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "samples" in r]
        return report, [r["samples"] for r in evals]

    even, even_sizes = run("even")
    grown, grown_sizes = run("grown", schedule="proportional")
    assert grown["plan"]["schedule"] == "proportional"
    assert {k: grown["plan"][k] for k in ("batch_size", "steps", "rounds")} == \
        {k: even["plan"][k] for k in ("batch_size", "steps", "rounds")}
    assert all(g > e for g, e in zip(grown_sizes[1:-1], even_sizes[1:-1], strict=True)), \
        (grown_sizes, even_sizes)
    again, again_sizes = run("again", schedule="proportional")
    assert again_sizes == grown_sizes and again["student_acc"] == grown["student_acc"]
