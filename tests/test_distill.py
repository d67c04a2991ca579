import json

import pytest
import torch
from safetensors.torch import load_file

import dfkd.engine.distill as engine
from dfkd.commands.synthesize import SynthesizeConfig, synthesize_set
from dfkd.config import Budget, DistillConfig, TeacherArgs, load_config, save_config
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.io import read_jsonl
from dfkd.models import default_student
from dfkd.report import REQUIRED_KEYS
from dfkd.synthesis import list_methods, method_class
from dfkd.synthesis.transfer_set import TransferSet
from method_sizes import small_options

CONTRACT_FILES = ("config.yaml", "metrics.jsonl", "report.json", "report.md", "samples.png",
                  "curves.png", "student.safetensors", "checkpoint.pt")
TIMING = ("synthesis_seconds", "train_seconds", "seconds", "machine_gflops")  # clock readings


def _cfg(teacher, out, **kw):
    base = dict(teacher=TeacherArgs(path=str(teacher)), method="deepinv",
                method_options={"batch_size": 32, "steps": 4},
                student="digits_cnn_quarter", out=str(out), budget="30steps", device="cpu",
                eval_dataset="digits", eval_points=3, batch_size=32, steps_per_round=10,
                checkpoint_seconds=0.0)
    base.update(kw)
    return DistillConfig(**base)


def _strip(report):
    return {k: v for k, v in report.items() if k not in TIMING}


def _evals(out):
    return [(r["step"], r["student_acc"], r["teacher_passes"])
            for r in read_jsonl(out / "metrics.jsonl") if "student_acc" in r]


def test_budget_parsing():
    assert Budget.parse("90s").seconds == 90 and Budget.parse("10m").seconds == 600
    assert Budget.parse("1.5h").seconds == 5400 and Budget.parse("500steps").steps == 500
    assert Budget.parse("200").steps == 200
    with pytest.raises(DfkdError, match="cannot read budget 'soon'"):
        Budget.parse("soon")
    assert Budget.parse("10steps").progress(5, 1e9) == 0.5


def test_config_yaml_round_trip(tmp_path):
    cfg = _cfg("t", tmp_path / "o", method_options={"steps": 3})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(DistillConfig, tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("methd: deepinv\n")
    with pytest.raises(DfkdError, match="unknown config keys"):
        load_config(DistillConfig, tmp_path / "bad.yaml")


def test_distill_writes_the_whole_run_directory(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "run"), progress=False)
    out = tmp_path / "run"
    for name in CONTRACT_FILES:
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved == report and set(REQUIRED_KEYS) <= set(saved)
    for key in ("teacher_acc", "student_acc", "agreement"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["teacher_acc"] > 0.85 and saved["student_acc"] > 0.1
    assert saved["steps"] == 30 and saved["synthesis_rounds"] == 3 and saved["samples"] == 96
    # synthesis: 3 rounds x 32 images x (4 steps + 1 labelling) + relabelling 30 x 32
    assert saved["teacher_passes"] == 3 * 32 * 5 + 30 * 32
    assert len(TransferSet.open(out / "transfer_set")) == 96
    assert len(_evals(out)) == 4  # the start, then eval_points=3 over the budget
    assert set(load_file(str(out / "student.safetensors")))
    assert "dfkd distill" not in (out / "config.yaml").read_text()


def test_stored_targets_skip_the_teachers_pass_per_step(digits_teacher, tmp_path):
    """--relabel stored: the same run, but the student's 30 steps cost the teacher nothing and
    their targets differ from the teacher's on the augmented batches (the same batches)."""
    stored = distill(_cfg(digits_teacher, tmp_path / "s", relabel="stored"), progress=False)
    teacher = distill(_cfg(digits_teacher, tmp_path / "t"), progress=False)
    assert stored["steps"] == teacher["steps"] == 30 and stored["samples"] == 96
    assert stored["teacher_passes"] == 3 * 32 * 5  # synthesis alone
    assert teacher["teacher_passes"] == 3 * 32 * 5 + 30 * 32
    assert stored["student_acc"] > 0.1
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]
              for d in ("s", "t")]
    assert losses[0] != losses[1]
    with pytest.raises(DfkdError, match="--relabel stored skips the teacher's pass on each "
                       "batch, and student loss 'at' needs"):
        distill(_cfg(digits_teacher, tmp_path / "at", relabel="stored", loss="at"),
                progress=False)
    with pytest.raises(DfkdError, match="unknown relabel 'stord'; choose one of: teacher, stored"):
        distill(_cfg(digits_teacher, tmp_path / "typo", relabel="stord"), progress=False)


def test_student_loss_decreases_on_a_fixed_transfer_set(digits_teacher, tmp_path):
    set_dir = tmp_path / "set"
    synthesize_set(SynthesizeConfig(teacher=TeacherArgs(path=str(digits_teacher)),
                                    method_options={"batch_size": 64, "steps": 4},
                                    num=128, out=str(set_dir), device="cpu"), progress=False)
    distill(_cfg(digits_teacher, tmp_path / "run", transfer_set=str(set_dir), budget="100steps",
                 augment="none", lr=3e-3), progress=False)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]


REGISTRY = sorted(list_methods(anchors=True))


@pytest.mark.parametrize("method", REGISTRY)
def test_every_method_resumes_a_killed_run_to_the_uninterrupted_result(digits_teacher, tmp_path,
                                                                       monkeypatch, method):
    """Killed after its second stored part (transfer-set methods) or right after its 21st
    batch, with no checkpoint holding that batch's effect yet (online methods)."""
    family = method_class(method).family
    where = "after_part_written" if family == "transfer_set" else "after_online_batch"
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, where, method=method,
                            method_options=small_options(method))


@pytest.mark.parametrize("method", ["deepinv", "cmi", "noise"])
def test_killed_run_resumes_exactly_from_inside_training(digits_teacher, tmp_path, monkeypatch,
                                                         method):
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, "training", method=method,
                            method_options=small_options(method))


@pytest.mark.parametrize("where,method,loss", [
    ("training", "deepinv", "crd"), ("after_part_written", "deepinv", "crd"),
    ("training", "deepinv", "at"), ("training", "noise", "at")])
def test_killed_run_resumes_exactly_with_every_student_loss(digits_teacher, tmp_path,
                                                            monkeypatch, where, method, loss):
    """CRD's memory and heads, and the RNG draws of its negatives, resume with the student."""
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, where, method=method,
                            method_options=small_options(method), loss=loss)


def test_killed_run_resumes_exactly_with_lra(digits_teacher, tmp_path, monkeypatch):
    """LRA's replay memory and ring position resume with the student (pushes at steps 4, 9,
    14, 19: the memory is in use when the run dies at step 20)."""
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, "after_online_batch",
                            method="dfad", method_options=small_options("dfad"), update="lra",
                            update_options={"every": 5, "memory": 3})


def test_killed_run_resumes_exactly_with_trigger_reversal(digits_teacher, tmp_path, monkeypatch):
    """The triggers the nc defence found (searched at step 6) and its stamping draws resume
    with the student (killed at step 17); every class flagged, so every batch is stamped."""
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, "training", method="deepinv",
                            method_options=small_options("deepinv"), defense="nc",
                            defense_options={"start": 0.2, "steps": 10, "samples": 8,
                                             "success": 0.1, "threshold": -1e9})


def _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, where, **kw):
    full = distill(_cfg(digits_teacher, tmp_path / "full", **kw), progress=False)

    class Killed(BaseException):
        pass

    calls = {"n": 0}
    if where == "after_part_written":
        original = TransferSet.append

        def append_then_die(self, batch):
            original(self, batch)
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed

        monkeypatch.setattr(TransferSet, "append", append_then_die)
    elif where == "after_online_batch":
        # batch 20 exists in every online schedule (and updates G in every generator method's;
        # RDSKD's G is frozen by then), and no checkpoint holds its effect yet
        cls = method_class(kw["method"])
        original = cls.synthesize

        def synthesize_then_die(self, student, index):
            batch = original(self, student, index)
            if index == 20:
                raise Killed
            return batch

        monkeypatch.setattr(cls, "synthesize", synthesize_then_die)
    else:
        original = engine.student_loss

        def loss_then_die(*a, **k):
            calls["n"] += 1
            if calls["n"] == 17:
                raise Killed
            return original(*a, **k)

        monkeypatch.setattr(engine, "student_loss", loss_then_die)
    cfg = _cfg(digits_teacher, tmp_path / "killed", **kw)
    with pytest.raises(Killed):
        distill(cfg, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "report.json").exists()
    with pytest.raises(DfkdError, match="already holds a run; add --resume"):
        distill(cfg, progress=False)
    resumed = distill(cfg, resume=True, progress=False)
    assert _strip(resumed) == _strip(full)
    assert _evals(tmp_path / "killed") == _evals(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_configuration(digits_teacher, tmp_path):
    distill(_cfg(digits_teacher, tmp_path / "r", budget="10steps"), progress=False)
    with pytest.raises(DfkdError, match=r"different configuration \(seed changed\)"):
        distill(_cfg(digits_teacher, tmp_path / "r", budget="10steps", seed=1), resume=True,
                progress=False)


def test_resuming_a_finished_run_reports_the_same(digits_teacher, tmp_path):
    cfg = _cfg(digits_teacher, tmp_path / "r", budget="10steps")
    first = distill(cfg, progress=False)
    assert _strip(distill(cfg, resume=True, progress=False)) == _strip(first)


@pytest.mark.parametrize("method,flags,recipe", [
    ("dfad", {}, ("sgd", 0.1)), ("noise", {}, ("sgd", 0.1)),  # one default for every method
    ("dfad", {"optimizer": "adam"}, ("adam", 1e-3)),  # --optimizer picks the optimizer's lr
    ("noise", {"lr": 0.02}, ("sgd", 0.02))])
def test_student_optimizer_is_sgd_unless_given(digits_teacher, tmp_path, method, flags, recipe):
    report = distill(_cfg(digits_teacher, tmp_path / "r", method=method, budget="2steps",
                          method_options=small_options(method),
                          **flags), progress=False)
    assert (report["optimizer"], report["lr"]) == recipe


def test_wall_clock_budget_stops(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "r", budget="6s", checkpoint_seconds=30.0),
                     progress=False)
    assert report["steps"] > 0 and report["budget_seconds"] == 6.0


@pytest.mark.parametrize("method", ["mvn", "zskd"])
def test_samples_per_class_finishes_the_transfer_set(digits_teacher, tmp_path, method):
    """Once the set holds samples_per_class per class, synthesis stops and training goes on."""
    opts = {"batch_size": 20, "steps": 2, "samples_per_class": 3}
    if method == "mvn":
        opts.update(center_steps=5, bootstrap_size=32)
    report = distill(_cfg(digits_teacher, tmp_path / "r", method=method, method_options=opts),
                     progress=False)
    # 30 student steps at 10 per round would take 3 rounds; the cap (30 samples) stops at 2
    assert (report["synthesis_rounds"], report["samples"], report["steps"]) == (2, 40, 30)
    opts["samples_per_class"] = -1
    with pytest.raises(DfkdError, match="samples_per_class must be >= 0"):
        distill(_cfg(digits_teacher, tmp_path / "neg", method=method, method_options=opts),
                progress=False)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(digits_teacher,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "student_loss", lambda *a, **k: torch.tensor(float("nan"),
                                                                             requires_grad=True))
    with pytest.raises(DfkdError, match="loss became nan at step 0; lower --lr"):
        distill(_cfg(digits_teacher, tmp_path / "r"), progress=False)
    assert (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_learning_rate_of_zero_or_less_is_an_error_not_the_default():
    from dfkd.optim import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    for lr in (0.0, -0.1):
        with pytest.raises(DfkdError, match=f"--lr must be positive, got {lr}"):
            make_optimizer("sgd", params, lr, 0.0)
    assert make_optimizer("sgd", params, None, 0.0).param_groups[0]["lr"] == 0.1
    assert make_optimizer("adam", params, 0.01, 0.0).param_groups[0]["lr"] == 0.01


def test_eval_dataset_that_does_not_fit_the_teacher(digits_teacher, tmp_path):
    from PIL import Image

    for k in range(2):
        (tmp_path / "imgs" / f"class{k}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (40 * k, 90, 200)).save(tmp_path / "imgs" / f"class{k}" / "a.png")
    with pytest.raises(DfkdError, match="has 3 channel") as e:
        distill(_cfg(digits_teacher, tmp_path / "r", eval_dataset="folder",
                     data_root=str(tmp_path / "imgs")), progress=False)
    assert "\n" not in str(e.value)


def test_unknown_student_and_method(digits_teacher, tmp_path):
    with pytest.raises(DfkdError, match="unknown model 'nonet'"):
        distill(_cfg(digits_teacher, tmp_path / "a", student="nonet"), progress=False)
    with pytest.raises(DfkdError, match="unknown method 'magic'"):
        distill(_cfg(digits_teacher, tmp_path / "b", method="magic"), progress=False)


def _spy_accel(monkeypatch):
    """Record, per synthesis call, whether bf16 autocast was on, and keep the prepared teacher."""
    seen = {"autocast": [], "teacher": None}
    cls = method_class("deepinv")
    synthesize, prepare = cls.synthesize, engine.Accel.prepare

    def spy_synthesize(self, student, index):
        seen["autocast"].append(torch.is_autocast_enabled("cpu")
                                and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return synthesize(self, student, index)

    def spy_prepare(self, classifier):
        seen["teacher"] = prepare(self, classifier)
        return seen["teacher"]

    monkeypatch.setattr(cls, "synthesize", spy_synthesize)
    monkeypatch.setattr(engine.Accel, "prepare", spy_prepare)
    return seen


def _wide_conv(classifier):
    """A conv with several input channels: its weight's memory format is unambiguous."""
    return next(m for m in classifier.net.modules()
                if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)


def test_accelerator_settings_reach_the_teacher(digits_teacher, tmp_path, monkeypatch):
    seen = _spy_accel(monkeypatch)
    plain = distill(_cfg(digits_teacher, tmp_path / "fp32", budget="20steps"), progress=False)
    assert plain["accel"] == "fp32" and seen["autocast"] == [False, False]
    conv = _wide_conv(seen["teacher"])
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)

    seen["autocast"].clear()
    report = distill(_cfg(digits_teacher, tmp_path / "bf16", budget="20steps", precision="bf16",
                          channels_last=True), progress=False)
    assert report["accel"] == "bf16+channels_last" and seen["autocast"] == [True, True]
    conv = _wide_conv(seen["teacher"])
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(TransferSet.open(tmp_path / "bf16" / "transfer_set").tensors()["x"]).all()
    assert report["steps"] == 20 and report["student_acc"] > 0.1
    # the evaluation runs the teacher as given: the same teacher accuracy under any setting
    assert report["teacher_acc"] == plain["teacher_acc"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit inside dynamo
@pytest.mark.parametrize("loss", ["kd", "at"])  # at: the loss's feature taps under dynamo
def test_compile_trains_the_student_as_eager_does(digits_teacher, tmp_path, loss):
    """--compile runs the student's training steps compiled: the same losses and weights up to
    rounding, and the saved weights keep the plain module's keys."""
    set_dir = tmp_path / "set"
    synthesize_set(SynthesizeConfig(teacher=TeacherArgs(path=str(digits_teacher)),
                                    method_options={"batch_size": 32, "steps": 4},
                                    num=64, out=str(set_dir), device="cpu"), progress=False)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        runs[compiled] = distill(_cfg(digits_teacher, out, transfer_set=str(set_dir),
                                      budget="50steps", loss=loss, compile=compiled),
                                 progress=False), out
    (eager, eager_out), (comp, comp_out) = runs[False], runs[True]
    assert comp["accel"] == "fp32+compile" and comp["steps"] == eager["steps"] == 50

    def losses(out):
        return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses(comp_out) == pytest.approx(losses(eager_out), rel=1e-3)
    w_eager = load_file(str(eager_out / "student.safetensors"))
    w_comp = load_file(str(comp_out / "student.safetensors"))
    assert w_comp.keys() == w_eager.keys()
    # 50 SGD steps let rounding drift single elements (a BatchNorm buffer by a few %); the
    # weights as a whole stay together
    keys = [k for k, v in w_eager.items() if v.is_floating_point()]
    drift = sum((w_comp[k] - w_eager[k]).norm() ** 2 for k in keys) ** 0.5
    assert drift < 1e-2 * sum(w_eager[k].norm() ** 2 for k in keys) ** 0.5


def test_synthesize_records_its_accelerator_setting(digits_teacher, tmp_path):
    meta = synthesize_set(SynthesizeConfig(teacher=TeacherArgs(path=str(digits_teacher)),
                                           method="mvn", num=16, out=str(tmp_path / "set"),
                                           device="cpu", channels_last=True,
                                           method_options={"batch_size": 16, "steps": 2}),
                          progress=False)
    assert meta["accel"] == "fp32+channels_last" and meta["samples"] == 16


def test_synthesize_chooses_its_method_by_distills_rule(digits_teacher, tmp_path):
    meta = synthesize_set(SynthesizeConfig(teacher=TeacherArgs(path=str(digits_teacher)), num=8,
                                           out=str(tmp_path / "set"), device="cpu",
                                           method_options={"batch_size": 8, "steps": 1}),
                          progress=False)
    assert meta["method"] == "deepinv" and "MFLOPs per image" in meta["method_choice"]


def test_an_unknown_precision_fails_before_any_work(digits_teacher, tmp_path):
    with pytest.raises(DfkdError, match="unknown precision 'fp16'; choose one of: fp32, bf16"):
        distill(_cfg(digits_teacher, tmp_path / "r", precision="fp16"), progress=False)
    assert not (tmp_path / "r").exists()


def test_a_zoo_teacher_gets_its_usual_student(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "r", student="", budget="2steps"),
                     progress=False)
    assert report["student"] == "digits_cnn_quarter"
    with pytest.raises(DfkdError, match="no default student for a 'mine' teacher; choose one "
                                        "with --student"):
        default_student("mine")


@pytest.mark.parametrize("where", ["training", "after_part_written"])
def test_killed_run_resumes_exactly_on_a_plan(digits_teacher, tmp_path, monkeypatch, where):
    """The planned schedule (counted in FLOPs under a step budget, kept in the checkpoint)
    resumes exactly; the plan here puts a round every few student steps."""
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, where, method="deepinv",
                            method_options={"batch_size": 8, "steps": 4}, steps_per_round=None)


def test_killed_run_resumes_exactly_with_abd(digits_teacher, tmp_path, monkeypatch):
    """ABD's shuffled teachers come back from the seed, its counters from the checkpoint, and
    self-retrospection (the last half of the budget here) draws its rows from the run's RNG."""
    _assert_resumes_exactly(digits_teacher, tmp_path, monkeypatch, "after_part_written",
                            defense="abd", defense_options={"sr_share": 0.5, "sr_steps": 2,
                                                            "copies": 2})
