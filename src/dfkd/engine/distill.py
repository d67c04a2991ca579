"""The engine: a budgeted loop of synthesize -> train the student -> log, resumable at any kill.

The loop has one shape for every method; its batch source (dfkd.engine.batch_source) is what
differs: transfer-set methods run a synthesis round whenever the schedule says one is due
(dfkd.engine.plan plans the rounds' size, their inversion steps and the student steps between them
from measured costs; `--schedule fixed` keeps the method's own round every 200 student steps) and
the student samples minibatches from everything synthesized so far; online methods hand the student
a fresh batch every step. The budget (wall clock or steps) covers synthesis and training alike;
evaluation and checkpointing stop the clock. A wall-clock budget is enforced inside synthesis too
(the synthesizer asks its `Clock`): a method that runs out of time mid-round is stopped there, the
unfinished round is dropped, and the student is evaluated where it stands, so every method gets the
same budget. A checkpoint after every round and every `checkpoint_seconds` holds the student,
optimizer, synthesizer, RNG states and the run's counters (RunState), so a resumed run replays
exactly what the killed one would have done. """

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dfkd.accel import Accel, pick_device
from dfkd.backdoor import Trigger
from dfkd.blackbox.teacher import QueryBudgetSpent, is_black_box, metered
from dfkd.checkpoint import load_checkpoint, save_checkpoint
from dfkd.config import (
    RELABELS,
    SCHEDULES,
    Budget,
    DistillConfig,
    prepare_run_dir,
    synthesis_share,
)
from dfkd.data import augment
from dfkd.engine.batch_source import StoredSet, method_source
from dfkd.engine.method_choice import AUTO, choose_compile, choose_method
from dfkd.engine.run_state import RunState
from dfkd.errors import DfkdError
from dfkd.evaluate import load_eval_data, metrics, model_asr, predict_logits
from dfkd.io import append_jsonl, read_jsonl, truncate_jsonl
from dfkd.machine import code_revision, matmul_gflops
from dfkd.models import default_student
from dfkd.models.classifier import Classifier, new_classifier, save_classifier
from dfkd.optim import cosine_lr, make_optimizer
from dfkd.report import save_curves, save_samples, write_report
from dfkd.student.defense import create_defense
from dfkd.student.losses import StudentLoss, create_student_loss, method_loss
from dfkd.student.start import start_student
from dfkd.student.update import create_update
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.base import Clock, require_choice
from dfkd.synthesis.transfer_set import TransferSet

LOG_EVERY = 25  # student steps between loss records in metrics.jsonl


class Evaluator:
    """Scores the student against labels and the teacher on the evaluation split, and the
    attack success rate of a backdoor trigger when one is given (report only)."""

    def __init__(self, name: str | None, teacher: Classifier, data_root, trigger: str = ""):
        self.name, self.teacher = name, teacher
        self.data = load_eval_data(name, teacher, data_root) if name else None
        self.trigger = Trigger.parse(trigger) if trigger else None
        if self.trigger and not self.data:
            raise DfkdError("--eval-trigger measures the attack on evaluation data; give "
                            "--eval-dataset")
        if self.trigger:  # a bad trigger fails before any work, not at the first evaluation
            self.trigger.check(teacher.spec.num_classes, teacher.spec.shape)
        self._teacher = None  # (logits, ASR) on first use: a black box is asked once its query
        # log is open, in its own stream, never against the run's query budget

    def teacher_outputs(self) -> tuple[torch.Tensor, float | None]:
        if self._teacher is None:
            with metered(self.teacher, "eval"):
                self._teacher = (predict_logits(self.teacher, self.data.x),
                                 model_asr(self.teacher, self.data, self.trigger)
                                 if self.trigger else None)
        return self._teacher

    def teacher_metrics(self) -> dict:
        if not self.data:
            return {}
        logits, asr = self.teacher_outputs()
        return {**metrics(logits, self.data.y), **({"asr": asr} if self.trigger else {})}

    def __call__(self, student: Classifier) -> dict:
        if not self.data:
            return {}
        return {**metrics(predict_logits(student, self.data.x), self.data.y,
                          self.teacher_outputs()[0]),
                **({"asr": model_asr(student, self.data, self.trigger)} if self.trigger else {})}


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
    require_choice(cfg, "schedule", SCHEDULES)
    require_choice(cfg, "relabel", RELABELS)
    synthesis_share(cfg.synthesis_share)
    Accel.of(cfg)  # a bad setting fails before the teacher is loaded
    device = pick_device(cfg.device)
    teacher = cfg.teacher.load().to(device).eval().requires_grad_(False)
    black_box = is_black_box(teacher)
    check_start(cfg, black_box)
    compiled, compile_choice = compile_setting(cfg, teacher, device, budget)
    accel = dataclasses.replace(Accel.of(cfg), compile=compiled)
    if compile_choice and progress:
        tqdm.write(f"--compile unset: {'on' if compiled else 'off'} ({compile_choice})")
    if compiled and compile_choice:
        # chosen by the rule, not asked for: what inductor fails to build runs eager (with
        # torch's warning) instead of ending the run
        from torch._dynamo import config as dynamo_config

        dynamo_config.suppress_errors = True
    eval_name = resolve_eval_dataset(cfg, teacher)
    evaluator = Evaluator(eval_name, teacher, cfg.data_root, cfg.eval_trigger)
    torch.manual_seed(cfg.seed)
    if black_box and not cfg.student:
        raise DfkdError("a black-box teacher has no architecture to derive the student from; "
                        "give --student NAME (`dfkd models`)")
    student_arch = cfg.student or default_student(teacher.arch)
    student = new_classifier(student_arch, teacher.spec).to(device)

    choice = None  # why --method auto chose the method it did
    if cfg.transfer_set:
        tset = TransferSet.open(cfg.transfer_set)
        if len(tset) == 0:
            raise DfkdError(f"transfer set '{cfg.transfer_set}' is empty")
        method = tset.read_meta().get("method", "transfer-set")
        synth, family, temperature = None, "stored", cfg.temperature or 4.0
        source = StoredSet(tset, cfg.augment)
    else:
        method, choice = choose_method(teacher) if cfg.method == AUTO else (cfg.method, None)
        if choice and progress:
            tqdm.write(f"--method auto: {method} ({choice})")
        synth = create_synthesizer(method, teacher, cfg.method_options, cfg.seed)
        family = synth.family
        temperature = cfg.temperature or synth.temperature
        synth.temperature = temperature  # --temperature reaches the method's own losses too
        # augmented copies are relabelled by the teacher: not for targets it did not give,
        # nor at a query apiece from a black box
        relabel = synth.targets_are_teacher_logits and not black_box
        source = method_source(synth, out, cfg.augment if relabel else "none",
                               lambda: accel.autocast(device))
    if black_box:
        check_black_box(cfg, synth)
    start = start_student(student.net, None if black_box else teacher.net,
                          "random" if black_box else requested_start(cfg, synth))
    loss, loss_fallback = cfg.loss, ""  # an asked-for loss is never swapped
    if not loss:
        loss, loss_fallback = method_loss(synth.student_loss if synth else "kd", method, teacher,
                                          student)
    if loss_fallback and progress:
        tqdm.write(loss_fallback)
    crit = create_student_loss(loss, cfg.loss_options, teacher=teacher, student=student,
                               temperature=temperature, method=method, family=family)
    if cfg.relabel == "stored" and crit.needs_teacher:
        raise DfkdError(f"--relabel stored skips the teacher's pass on each batch, and student "
                        f"loss '{crit.name}' needs the teacher's features from it; use "
                        "--relabel teacher")
    update = create_update(cfg.update, cfg.update_options, family, crit.name)
    defense = create_defense(cfg.defense, cfg.defense_options, teacher, crit.name, update,
                             cfg.seed)
    # after the method and the loss have found their layers by plain module paths (a compiled
    # net's paths gain a prefix); evaluation above ran the teacher as it was given
    if not black_box:
        accel.prepare(teacher)
    prepare_run_dir(out, cfg, resume, command)
    if black_box:
        teacher.budget = cfg.query_budget
        teacher.open_log(out / "queries")

    # the loss's own parameters (CRD's embedding heads) train with the student
    optimizer = make_optimizer(cfg.optimizer, [*student.parameters(), *crit.parameters()],
                               cfg.lr, cfg.weight_decay)
    base_lr = optimizer.param_groups[0]["lr"]
    gen = torch.Generator().manual_seed(cfg.seed)
    state = RunState()
    ckpt_path = out / "checkpoint.pt"

    def checkpoint():
        last_x = source.last_x
        save_checkpoint(ckpt_path, student.net, optimizer, gen, state.to_dict(),
                        parts=source.checkpoint_parts(),
                        synth=synth.state_dict() if synth else {},
                        student_loss=crit.state_dict(),
                        update=update.state_dict() if update else {},
                        defense=defense.state_dict() if defense else {},
                        queries=teacher.query_state() if black_box else {},
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
        if defense:
            defense.load_state_dict(ckpt["defense"])
        if black_box:
            teacher.load_query_state(ckpt["queries"])
        source.resume(ckpt["parts"])
        source.last_x = ckpt["last_x"] if ckpt["last_x"].numel() else None
        truncate_jsonl(metrics_path, "step", state.step)
    else:
        metrics_path.unlink(missing_ok=True)
        source.start_fresh()

    source.plan(cfg, budget, teacher, student, state,
                say=tqdm.write if progress else lambda line: None)

    trained = accel.training_view(student)  # the student as its plain steps call it
    round_start = [0.0]  # perf_counter when the running synthesis call began
    if synth and budget.seconds is not None:
        synth.clock = Clock(budget.seconds,
                            lambda: state.elapsed() + time.perf_counter() - round_start[0])
    passes = lambda: ((synth.teacher_passes if synth else 0) + state.relabel_passes  # noqa: E731
                      + (update.teacher_passes if update else 0))
    total = budget.steps if budget.steps is not None else budget.seconds
    bar = tqdm(total=total, desc=f"{method} -> {student_arch}", disable=not progress,
               unit="step" if budget.steps is not None else "s", mininterval=0.5,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}{postfix}]")
    done_so_far = lambda: min(total, state.step if budget.steps is not None  # noqa: E731
                              else state.elapsed())
    bar.update(done_so_far())

    def log_eval():
        result = evaluator(student)
        record = {"step": state.step, "seconds": round(state.elapsed(), 3),
                  "synthesis_seconds": round(state.synthesis_seconds, 3),
                  "train_seconds": round(state.train_seconds, 3),
                  "teacher_passes": passes(), "samples": source.samples,
                  "student_acc": result.get("acc"), "agreement": result.get("agreement")}
        if "asr" in result:
            record["student_asr"] = result["asr"]
        if black_box:
            record["queries"] = teacher.paid["train"]
        append_jsonl(metrics_path, record)
        if result:
            bar.set_postfix(acc=f"{result['acc']:.3f}", refresh=False)
        return result

    def run_progress() -> float:
        """The share of the budget spent, or of the query budget where that is further on: the
        learning rate anneals and the evaluations spread over whichever ends the run first."""
        share = budget.progress(state.step, state.elapsed())
        if black_box and cfg.query_budget:
            share = max(share, min(1.0, teacher.paid["train"] / cfg.query_budget))
        return share

    if state.step == 0 and not state.init_evaluated:
        # where the student starts (the teacher's slices score well above chance): step 0
        state.init_acc, state.init_evaluated = log_eval().get("acc"), True
    last_ckpt = time.monotonic()
    ended_by = "budget"
    try:
        while not budget.done(state.step, state.elapsed()):
            before = done_so_far()
            t0 = round_start[0] = time.perf_counter()
            if source.round_due(state):
                batch = source.make_round(student, state)
                state.synthesis_seconds += time.perf_counter() - t0
                if budget.done(state.step, state.elapsed()):
                    if black_box:  # its answers are paid for: stored (for a resume), not trained on
                        source.keep_round(batch, state)
                    break  # out of time mid-round: the student stops where it stands
                source.keep_round(batch, state)
                checkpoint()
                last_ckpt = time.monotonic()
                bar.update(done_so_far() - before)
                continue
            synthesized_before = state.synthesis_seconds
            batch = source.next_batch(student, state, gen, cfg.batch_size)
            if budget.done(state.step, state.elapsed()):
                break  # an online method's batch used up the budget
            x = batch["x"].to(device)
            teacher_logits = batch["target_logits"].to(device) if "target_logits" in batch else None
            augmented = source.augment != "none"
            relabel = augmented and cfg.relabel == "teacher"
            if augmented:
                x, kept = augment.apply(source.augment, batch["x"], gen,
                                        None if relabel else teacher_logits, temperature)
                x, teacher_logits = x.to(device), teacher_logits if relabel else kept
            if relabel or (crit.needs_teacher and teacher_logits is not None and not update):
                # the teacher on exactly the student's batch: new targets after augmentation, and
                # the features that at, fa and crd compare (LRA taps them on each of its batches)
                with torch.no_grad(), crit.capture("teacher"), accel.autocast(device):
                    teacher_logits = teacher(x).float()
                state.relabel_passes += x.shape[0]
            progress = run_progress()
            cosine_lr(optimizer, base_lr, progress)
            if defense:
                defense.set_lr(optimizer, progress)
                x = defense.inputs(x, progress, gen)
            student.train()
            if update:
                loss = update.loss(crit, student, teacher, x, teacher_logits, gen, state.step)
            elif defense and defense.weighs_loss:
                loss = defense.student_loss(crit, student, x, teacher_logits, batch)
            else:
                loss = student_loss(crit, trained, x, teacher_logits, batch, gen,
                                    source.samples or 0)
            if not torch.isfinite(loss):
                checkpoint()
                raise DfkdError(f"the student's loss became {loss.item()} at step "
                                f"{state.step}; lower --lr or the temperature (the last good "
                                "state is checkpointed)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if defense:
                defense.after_backward(student, teacher, x, gen, progress)
            optimizer.step()
            state.record_loss(loss.item())
            state.train_seconds += time.perf_counter() - t0 - \
                (state.synthesis_seconds - synthesized_before)
            if state.step % LOG_EVERY == 0:
                mean_loss = state.take_mean_loss()
                append_jsonl(metrics_path, {"step": state.step,
                                            "seconds": round(state.elapsed(), 3),
                                            "loss": mean_loss,
                                            "lr": optimizer.param_groups[0]["lr"]})
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            reached = int(run_progress() * cfg.eval_points)
            if state.evals < reached < cfg.eval_points:  # the final point is logged after the loop
                state.evals = reached
                log_eval()
            if time.monotonic() - last_ckpt > cfg.checkpoint_seconds:
                checkpoint()
                last_ckpt = time.monotonic()
            bar.update(done_so_far() - before)
    except QueryBudgetSpent:  # the student stands where the last full step left it
        ended_by = "query budget"
    bar.close()

    final = log_eval()
    checkpoint()
    save_classifier(student, out / "student.safetensors",
                    {"dfkd_method": method, "dfkd_teacher": str(cfg.teacher.path)})
    crit.remove()
    report = build_report(cfg, method, budget, temperature, teacher, student, evaluator, final,
                          state, passes(), source, synth, device, accel, base_lr, start,
                          parts=(crit, synth, update, defense, teacher if black_box else None))
    report["ended_by"] = ended_by
    if loss_fallback:
        report["student_loss_fallback"] = loss_fallback
    if choice:
        report["method_choice"] = choice
    if compile_choice:
        report["compile_choice"] = compile_choice
    write_report(report, out)
    if source.last_x is not None:
        save_samples(source.last_x, out / "samples.png", f"{method}: synthesized inputs",
                     source.pictured_targets())
    save_curves(read_jsonl(metrics_path), out / "curves.png",
                f"{method}: {teacher.arch} -> {student_arch} ({eval_name or 'no eval data'})")
    return report


def student_loss(crit: StudentLoss, student: nn.Module, x: torch.Tensor,
                 teacher_logits: torch.Tensor | None, batch: dict, gen: torch.Generator,
                 set_size: int) -> torch.Tensor:
    """The run's student loss on one batch: the student's forward with the loss's layers tapped.
    `student` is the Classifier or its compiled view, `set_size` the transfer set's current size
    (CRD's memory), `gen` the run's RNG."""
    if teacher_logits is None and crit.name != "ce":
        raise DfkdError(f"this method's batches carry true labels and no teacher logits, so "
                        f"student loss '{crit.name}' cannot apply; leave --loss unset")
    with crit.capture("student"):
        logits = student(x)
    return crit(logits, teacher_logits, batch, set_size=set_size, gen=gen)


def compile_setting(cfg: DistillConfig, teacher, device: torch.device, budget: Budget
                    ) -> tuple[bool, str]:
    """--compile as given, else the rule's choice with its reason. Runs with a backdoor defence
    or LRA stay eager unless asked: their extra passes were never measured compiled."""
    if cfg.compile is not None:
        return cfg.compile, ""
    if cfg.defense != "none" or cfg.update != "plain":
        return False, "a defence or a student update of its own: eager unless --compile"
    return choose_compile(teacher, device, budget)


def requested_start(cfg: DistillConfig, synth) -> str:
    """Where the student's weights are asked to start: --student-init, except for the
    no-teacher anchor and under a backdoor defence (the teacher's weights carry the trigger's
    response), which always start random."""
    if cfg.defense != "none":
        return "random"
    return cfg.student_init if synth is None or synth.student_sees_teacher else "random"


def check_start(cfg: DistillConfig, black_box: bool = False) -> None:
    if cfg.defense != "none" and cfg.student_init == "teacher":
        raise DfkdError(f"--defense {cfg.defense} starts the student from its own "
                        "initialization: the teacher's weights would carry its backdoor; drop "
                        "--student-init teacher")
    if black_box and cfg.student_init == "teacher":
        raise DfkdError("a black-box teacher has no weights to start the student from; drop "
                        "--student-init teacher")


BLACK_BOX_LOSSES = ("kd", "l1")  # student losses that need only the teacher's outputs


def check_black_box(cfg: DistillConfig, synth) -> None:
    """Refuse, in one line each, what needs more of the teacher than its answers (the method
    itself is checked where it is created)."""
    if synth is None:
        raise DfkdError("--transfer-set trains on a stored set and needs no teacher API; give "
                        "the teacher the set was made from")
    loss = cfg.loss or synth.student_loss
    if loss not in BLACK_BOX_LOSSES:
        raise DfkdError(f"student loss '{loss}' reads the teacher's layers; with a black-box "
                        f"teacher use {' or '.join(BLACK_BOX_LOSSES)}")
    for flag, value in (("--update", cfg.update != "plain" and cfg.update),
                        ("--defense", cfg.defense != "none" and cfg.defense)):
        if value:
            raise DfkdError(f"{flag} {value} needs the teacher's weights or layers; a black-box "
                            "teacher has neither")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_report(cfg, method, budget, temperature, teacher, student, evaluator, final,
                 state: RunState, teacher_passes, source, synth, device, accel, lr, start,
                 parts) -> dict:
    """report.json: the run's numbers, then what each of its parts (student loss, method,
    student update, defence) reports of itself."""
    t = evaluator.teacher_metrics()
    report = {
        "method": method, "teacher_acc": t.get("acc"), "student_acc": final.get("acc"),
        "agreement": final.get("agreement"), "student_init_acc": state.init_acc,
        "synthesis_seconds": round(state.synthesis_seconds, 3),
        "train_seconds": round(state.train_seconds, 3), "teacher_passes": teacher_passes,
        "seed": cfg.seed, "dataset": evaluator.name, "budget": cfg.budget,
        "student": student.arch, "teacher": str(cfg.teacher.path), "teacher_arch": teacher.arch,
        "student_params": _params(student.net),
        "teacher_params": None if is_black_box(teacher) else _params(teacher.net),
        "steps": state.step, "synthesis_rounds": state.rounds,
        "optimizer": cfg.optimizer, "lr": lr, "student_init": start,
        "samples": source.samples, "temperature": temperature,
        "passes_over_set": round(state.set_passes, 2) if source.samples is not None else None,
        "student_ece": final.get("ece"), "teacher_ece": t.get("ece"),
        "device": str(device), "accel": accel.label, "torch": torch.__version__,
        "python": platform.python_version(), "dfkd_commit": code_revision(),
        "machine_gflops": matmul_gflops(device),  # after the budget: it costs the run nothing
        "method_options": dict(vars(synth.opts)) if synth else {},
        "per_class_acc": final.get("per_class_acc"),
    }
    if evaluator.trigger:
        report.update(trigger=evaluator.trigger.spec(), teacher_asr=t["asr"],
                      student_asr=final["asr"])
    if state.plan:
        fixed = state.costs.get("unit") == "none"  # asked for, or a black box's fallback
        report["plan"] = {**state.plan, "schedule": "fixed" if fixed else cfg.schedule,
                          "costs": state.costs}
        if state.first_plan:
            report["plan"]["from_probe"] = state.first_plan
    for part in parts:
        if part is not None:
            report.update(part.report())
    if budget.seconds is not None:
        report["budget_seconds"] = budget.seconds
        report["budget_overrun_seconds"] = round(max(0.0, state.elapsed() - budget.seconds), 3)
    return report
