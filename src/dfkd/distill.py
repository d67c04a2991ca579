"""The engine: a budgeted loop of synthesize -> train the student -> log, resumable at any kill.

Transfer-set methods run a synthesis round whenever the schedule says one is due (dfkd.plan
plans the rounds' size, their inversion steps and the student steps between them from measured
costs; `--schedule fixed` keeps the method's own round every 200 student steps) and the
student samples minibatches from everything synthesized so far; online methods hand the student
a fresh batch every step. The budget (wall clock or steps) covers synthesis and training alike;
evaluation and checkpointing stop the clock. A wall-clock budget is enforced inside synthesis
too (`Synthesizer.should_stop`): a method that runs out of time mid-round is stopped there, the
unfinished round is dropped, and the student is evaluated where it stands, so every method gets
the same budget. A checkpoint after every round and every
`checkpoint_seconds` holds the student, optimizer, synthesizer, RNG states and counters, so a
resumed run replays exactly what the killed one would have done.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dfkd import augment
from dfkd.accel import Accel, pick_device
from dfkd.checkpoint import load_checkpoint, save_checkpoint
from dfkd.config import (
    FIXED_STEPS_PER_ROUND,
    SCHEDULES,
    Budget,
    DistillConfig,
    prepare_run_dir,
)
from dfkd.errors import DfkdError
from dfkd.evaluate import load_eval_data, metrics, predict_logits
from dfkd.io import append_jsonl, read_jsonl, truncate_jsonl
from dfkd.models import default_student
from dfkd.optim import cosine_lr, make_optimizer
from dfkd.plan import SYNTHESIS_SHARE, Costs, Plan, measure_costs, plan_run, replan_steps_per_round
from dfkd.report import save_curves, save_samples, write_report
from dfkd.student_init import init_student
from dfkd.student_losses import StudentLoss, create_student_loss
from dfkd.student_update import create_update
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.base import Clock
from dfkd.teacher import Classifier, new_classifier, save_classifier
from dfkd.transfer_set import TransferSet

LOG_EVERY = 25  # student steps between loss records in metrics.jsonl


class Evaluator:
    """Scores the student against labels and the teacher on the evaluation split (report only)."""

    def __init__(self, name: str | None, teacher: Classifier, data_root):
        self.name = name
        self.data = load_eval_data(name, teacher, data_root) if name else None
        self.teacher_logits = predict_logits(teacher, self.data.x) if self.data else None

    def teacher_metrics(self) -> dict:
        return metrics(self.teacher_logits, self.data.y) if self.data else {}

    def __call__(self, student: Classifier) -> dict:
        if not self.data:
            return {}
        return metrics(predict_logits(student, self.data.x), self.data.y, self.teacher_logits)


def resolve_eval_dataset(cfg: DistillConfig, teacher: Classifier) -> str | None:
    if cfg.eval_dataset == "none":
        return None
    return cfg.eval_dataset or teacher.spec.dataset


def distill(cfg: DistillConfig, *, resume: bool = False, progress: bool = True,
            command: str = "") -> dict:
    """Run (or resume) one distillation and write its run directory; returns report.json."""
    out = Path(cfg.out)
    budget = Budget.parse(cfg.budget)
    augment.check(cfg.augment)
    if cfg.schedule not in SCHEDULES:
        raise DfkdError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    accel = Accel.of(cfg)
    device = pick_device(cfg.device)
    teacher = cfg.teacher.load().to(device).eval().requires_grad_(False)
    eval_name = resolve_eval_dataset(cfg, teacher)
    evaluator = Evaluator(eval_name, teacher, cfg.data_root)
    torch.manual_seed(cfg.seed)
    student_arch = cfg.student or default_student(teacher.arch)
    student = new_classifier(student_arch, teacher.spec).to(device)

    if cfg.transfer_set:
        tset = TransferSet.open(cfg.transfer_set)
        if len(tset) == 0:
            raise DfkdError(f"transfer set '{cfg.transfer_set}' is empty")
        method = tset.read_meta().get("method", "transfer-set")
        synth, family, temperature = None, "stored", cfg.temperature or 4.0
    else:
        synth = create_synthesizer(cfg.method, teacher, cfg.method_options, cfg.seed)
        method, family = cfg.method, synth.family
        temperature = cfg.temperature or synth.temperature
        synth.temperature = temperature  # --temperature reaches the method's own losses too
        tset = TransferSet(out / "transfer_set") if family == "transfer_set" else None
    start = init_student(student.net, teacher.net, student_start(cfg, synth))
    crit = create_student_loss(cfg.loss or (synth.student_loss if synth else "kd"),
                               cfg.loss_options, teacher=teacher, student=student,
                               temperature=temperature, method=method, family=family)
    update = create_update(cfg.update, cfg.update_options, family, crit.name)
    # after the method and the loss have found their layers by plain module paths (a compiled
    # net's paths gain a prefix); evaluation above ran the teacher as it was given
    accel.prepare(teacher)
    prepare_run_dir(out, cfg, resume, command)

    # the loss's own parameters (CRD's embedding heads) train with the student
    optimizer = make_optimizer(cfg.optimizer, [*student.parameters(), *crit.parameters()],
                               cfg.lr, cfg.weight_decay)
    base_lr = optimizer.param_groups[0]["lr"]
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"step": 0, "synthesis_seconds": 0.0, "train_seconds": 0.0, "rounds": 0,
             "evals": 0, "loss_sum": 0.0, "loss_n": 0, "relabel_passes": 0, "next_round": 0,
             "image_steps": 0, "set_passes": 0.0, "plan": {}, "costs": {}}
    last_x = None
    ckpt_path = out / "checkpoint.pt"

    def checkpoint():
        save_checkpoint(ckpt_path, student.net, optimizer, gen, state,
                        parts=len(tset.parts) if tset is not None and synth is not None else 0,
                        synth=synth.state_dict() if synth else {},
                        student_loss=crit.state_dict(),
                        update=update.state_dict() if update else {},
                        last_x=last_x if last_x is not None else torch.zeros(0))

    metrics_path = out / "metrics.jsonl"
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, student.net, optimizer, gen, state)
        if synth:
            synth.load_state_dict(ckpt["synth"])
        if "student_loss" in ckpt:  # absent from checkpoints written before --loss existed
            crit.load_state_dict(ckpt["student_loss"])
        if update:
            update.load_state_dict(ckpt["update"])
        if family == "transfer_set":
            tset = TransferSet.open(out / "transfer_set", limit=ckpt["parts"])
        last_x = ckpt["last_x"] if ckpt["last_x"].numel() else None
        truncate_jsonl(metrics_path, "step", state["step"])
    else:
        metrics_path.unlink(missing_ok=True)
        if family == "transfer_set" and (out / "transfer_set").exists():
            # parts of a run killed before its first checkpoint: replayed from round 0
            tset = TransferSet.open(out / "transfer_set", limit=0)

    if family == "transfer_set" and synth and not state["plan"]:
        plan, costs = plan_schedule(cfg, budget, synth, teacher, student)
        state["plan"], state["costs"] = plan.to_dict(), dict(vars(costs))
    schedule = Schedule(cfg, budget, synth, state) if family == "transfer_set" and synth else None
    if schedule and progress:
        tqdm.write(schedule.describe())

    elapsed = lambda: state["synthesis_seconds"] + state["train_seconds"]  # noqa: E731
    round_start = [0.0]  # perf_counter when the running synthesis call began
    if synth and budget.seconds is not None:
        synth.clock = Clock(budget.seconds,
                            lambda: elapsed() + time.perf_counter() - round_start[0])
    limit = synth.sample_limit() if synth else None  # a finished transfer set stops synthesis
    passes = lambda: ((synth.teacher_passes if synth else 0) + state["relabel_passes"]  # noqa: E731
                      + (update.teacher_passes if update else 0))
    total = budget.steps if budget.steps is not None else budget.seconds
    bar = tqdm(total=total, desc=f"{method} -> {student_arch}", disable=not progress,
               unit="step" if budget.steps is not None else "s", mininterval=0.5,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}{postfix}]")
    done_so_far = lambda: min(total, state["step"] if budget.steps is not None  # noqa: E731
                              else elapsed())
    bar.update(done_so_far())

    def log_eval():
        result = evaluator(student)
        record = {"step": state["step"], "seconds": round(elapsed(), 3),
                  "synthesis_seconds": round(state["synthesis_seconds"], 3),
                  "train_seconds": round(state["train_seconds"], 3),
                  "teacher_passes": passes(), "samples": len(tset) if tset is not None else None,
                  "student_acc": result.get("acc"), "agreement": result.get("agreement")}
        append_jsonl(metrics_path, record)
        if result:
            bar.set_postfix(acc=f"{result['acc']:.3f}", refresh=False)
        return result

    last_ckpt = time.monotonic()
    while not budget.done(state["step"], elapsed()):
        before = done_so_far()
        t0 = round_start[0] = time.perf_counter()
        if schedule and state["next_round"] <= state["step"] \
                and not (limit is not None and len(tset) >= limit):
            with accel.autocast(device):
                batch = synth.synthesize(student, state["rounds"])
            if budget.done(state["step"], elapsed() + time.perf_counter() - t0):
                state["synthesis_seconds"] += time.perf_counter() - t0
                break  # out of time mid-round: the student stops where it stands
            tset.append(batch)
            last_x = batch["x"][:64].cpu()
            state["rounds"] += 1
            state["synthesis_seconds"] += time.perf_counter() - t0
            state["image_steps"] += len(batch["x"]) * schedule.plan.steps
            state["next_round"] = state["step"] + schedule.steps_to_next_round(elapsed())
            checkpoint()
            last_ckpt = time.monotonic()
            bar.update(done_so_far() - before)
            continue
        if family == "online":
            with accel.autocast(device):
                batch = synth.synthesize(student, state["step"])
            t1 = time.perf_counter()
            state["synthesis_seconds"] += t1 - t0
            if budget.done(state["step"], elapsed()):
                break
            last_x = batch["x"][:64].detach().cpu()
            t0 = t1
        else:
            batch = tset.sample(cfg.batch_size, gen)
            state["set_passes"] += cfg.batch_size / len(tset)
        x = batch["x"].to(device)
        teacher_logits = batch["logits"].to(device) if "logits" in batch else None
        relabel = family != "online" and cfg.augment != "none"
        if relabel:
            x = augment.apply(cfg.augment, batch["x"], gen).to(device)
        if relabel or (crit.needs_teacher and teacher_logits is not None and not update):
            # the teacher on exactly the student's batch: new targets after augmentation, and
            # the features that at, fa and crd compare (LRA taps them on each of its batches)
            with torch.no_grad(), crit.capture("teacher"), accel.autocast(device):
                teacher_logits = teacher(x).float()
            state["relabel_passes"] += x.shape[0]
        cosine_lr(optimizer, base_lr, budget.progress(state["step"], elapsed()))
        student.train()
        if update:
            loss = update.loss(crit, student, teacher, x, teacher_logits, gen, state["step"])
        else:
            loss = student_loss(crit, student, x, teacher_logits, batch, gen,
                                len(tset) if tset is not None else 0)
        if not torch.isfinite(loss):
            checkpoint()
            raise DfkdError(f"the student's loss became {loss.item()} at step {state['step']}; "
                            "lower --lr or the temperature (the last good state is checkpointed)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] += 1
        state["loss_sum"] += loss.item()
        state["loss_n"] += 1
        state["train_seconds"] += time.perf_counter() - t0
        if state["step"] % LOG_EVERY == 0:
            append_jsonl(metrics_path, {"step": state["step"], "seconds": round(elapsed(), 3),
                                        "loss": state["loss_sum"] / state["loss_n"],
                                        "lr": optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.4f}", refresh=False)
            state["loss_sum"], state["loss_n"] = 0.0, 0
        reached = int(budget.progress(state["step"], elapsed()) * cfg.eval_points)
        if state["evals"] < reached < cfg.eval_points:  # the final point is logged after the loop
            state["evals"] = reached
            log_eval()
        if time.monotonic() - last_ckpt > cfg.checkpoint_seconds:
            checkpoint()
            last_ckpt = time.monotonic()
        bar.update(done_so_far() - before)
    bar.close()

    final = log_eval()
    checkpoint()
    save_classifier(student, out / "student.safetensors",
                    {"dfkd_method": method, "dfkd_teacher": str(cfg.teacher.path)})
    crit.remove()
    report = build_report(cfg, method, budget, temperature, teacher, student, evaluator, final,
                          state, passes(), tset, synth, device, crit, update, base_lr, start)
    write_report(report, out)
    if last_x is not None:
        targets = tset.parts[-1]["targets"] if family == "transfer_set" and tset.parts else None
        save_samples(last_x, out / "samples.png", f"{method}: synthesized inputs",
                     targets if targets is not None and (targets >= 0).all() else None)
    save_curves(read_jsonl(metrics_path), out / "curves.png",
                f"{method}: {teacher.arch} -> {student_arch} ({eval_name or 'no eval data'})")
    return report


def student_loss(crit: StudentLoss, student: Classifier, x: torch.Tensor,
                 teacher_logits: torch.Tensor | None, batch: dict, gen: torch.Generator,
                 set_size: int) -> torch.Tensor:
    """The run's student loss on one batch: the student's forward with the loss's layers tapped.
    `set_size` is the transfer set's current size (CRD's memory), `gen` the run's RNG."""
    if teacher_logits is None and crit.name != "ce":
        raise DfkdError(f"this method's batches carry true labels and no teacher logits, so "
                        f"student loss '{crit.name}' cannot apply; leave --loss unset")
    with crit.capture("student"):
        logits = student(x)
    return crit(logits, teacher_logits, batch, set_size=set_size, gen=gen)


def student_start(cfg: DistillConfig, synth) -> str:
    """Where the student's weights are asked to start: --student-init, except for the
    no-teacher anchor, which always starts random."""
    return cfg.student_init if synth is None or synth.student_sees_teacher else "random"


def plan_schedule(cfg: DistillConfig, budget: Budget, synth, teacher: Classifier,
                  student: Classifier) -> tuple[Plan, Costs]:
    """The run's schedule before its first round. `planned`: from the costs measured here
    (timed under a wall-clock budget, counted in FLOPs under a step budget, which keeps step
    budgets reproducible) and the method's options the user did not set. `fixed`: the method's
    own round, FIXED_STEPS_PER_ROUND student steps apart."""
    size_key, steps_key = synth.round_options
    batch, steps = getattr(synth.opts, size_key), getattr(synth.opts, steps_key)
    if cfg.schedule == "fixed":
        spr = cfg.steps_per_round or FIXED_STEPS_PER_ROUND
        return Plan(batch, steps, spr, 0, 0, 0.0), Costs(0.0, 0.0, "none")
    timed = budget.seconds is not None
    costs = measure_costs(teacher, student, cfg.batch_size, timed=timed)
    seconds = budget.seconds if timed else \
        budget.steps * costs.student_step / (1 - SYNTHESIS_SHARE)
    fixed = frozenset(k for k, name in (("batch_size", size_key), ("steps", steps_key))
                      if name in cfg.method_options)
    plan = plan_run(costs, seconds, teacher.spec.num_classes, batch_size=batch, steps=steps,
                    fixed=fixed, steps_per_round=cfg.steps_per_round)
    return plan, costs


class Schedule:
    """When the next synthesis round is due. The plan's round size and steps are set on the
    method once; under a planned wall-clock run the student steps to the next round are
    re-planned after each round from the costs measured so far."""

    def __init__(self, cfg: DistillConfig, budget: Budget, synth, state: dict):
        self.plan, self.state, self.budget = Plan(**state["plan"]), state, budget
        self.replan = (cfg.schedule == "planned" and budget.seconds is not None
                       and cfg.steps_per_round is None)
        self.unit = state["costs"]["unit"]
        size_key, steps_key = synth.round_options
        setattr(synth.opts, size_key, self.plan.batch_size)
        setattr(synth.opts, steps_key, self.plan.steps)

    def describe(self) -> str:
        if self.unit == "none":
            return (f"fixed schedule: rounds of {self.plan.batch_size} samples x {self.plan.steps} "
                    f"steps, {self.plan.steps_per_round} student steps apart")
        c = self.state["costs"]
        return (f"{self.plan.describe()}; costs ({self.unit}): {c['inversion']:.3g} per image "
                f"and inversion step, {c['student_step']:.3g} per student step")

    def steps_to_next_round(self, spent: float) -> int:
        if not self.replan:
            return self.plan.steps_per_round
        s = self.state
        measured = Costs(s["synthesis_seconds"] / max(1, s["image_steps"]),
                         s["train_seconds"] / s["step"] if s["step"] else
                         s["costs"]["student_step"])
        return replan_steps_per_round(self.plan, measured, self.budget.seconds - spent,
                                      s["synthesis_seconds"], spent)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_report(cfg, method, budget, temperature, teacher, student, evaluator, final, state,
                 teacher_passes, tset, synth, device, crit, update, lr, start) -> dict:
    t = evaluator.teacher_metrics()
    report = {
        "method": method, "teacher_acc": t.get("acc"), "student_acc": final.get("acc"),
        "agreement": final.get("agreement"),
        "synthesis_seconds": round(state["synthesis_seconds"], 3),
        "train_seconds": round(state["train_seconds"], 3), "teacher_passes": teacher_passes,
        "seed": cfg.seed, "dataset": evaluator.name, "budget": cfg.budget,
        "student": student.arch, "teacher": str(cfg.teacher.path), "teacher_arch": teacher.arch,
        "student_params": _params(student.net), "teacher_params": _params(teacher.net),
        "steps": state["step"], "synthesis_rounds": state["rounds"],
        "optimizer": cfg.optimizer, "lr": lr, "student_init": start,
        "samples": len(tset) if tset is not None else None, "temperature": temperature,
        "passes_over_set": round(state["set_passes"], 2) if tset is not None else None,
        "student_ece": final.get("ece"), "teacher_ece": t.get("ece"),
        "device": str(device), "accel": Accel.of(cfg).label, "torch": torch.__version__,
        "python": platform.python_version(),
        "method_options": dict(vars(synth.opts)) if synth else {},
        "per_class_acc": final.get("per_class_acc"), **crit.report(),
    }
    if state["plan"]:
        report["plan"] = {**state["plan"], "schedule": cfg.schedule, "costs": state["costs"]}
    if synth:
        report.update(synth.report())
    if update:
        report.update(update.report())
    if budget.seconds is not None:
        report["budget_seconds"] = budget.seconds
        spent = state["synthesis_seconds"] + state["train_seconds"]
        report["budget_overrun_seconds"] = round(max(0.0, spent - budget.seconds), 3)
    return report
