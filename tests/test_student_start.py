"""--student-init teacher | auto: the student starts from slices of the teacher's tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.io import read_jsonl
from dfkd.models import create_model
from dfkd.student.start import start_student


def _pair(teacher_arch: str, student_arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(teacher_arch).eval(), create_model(student_arch).eval()


@torch.no_grad()
def _ignore_channels_past_the_student(teacher, student) -> None:
    """Zero every teacher weight that reads an input channel the student does not have: the
    teacher's function then depends only on the channels the student inherits."""
    mine = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.ndim >= 2 and name in mine:
            value[:, mine[name].shape[1]:] = 0


@pytest.mark.parametrize("teacher_arch, student_arch", [("lenet5", "lenet5_half"),
                                                        ("digits_cnn", "digits_cnn_quarter")])
def test_a_slimmer_student_computes_the_teacher_it_was_cut_from(teacher_arch, student_arch):
    """The slices are consistent along the whole network (kept outputs feed kept inputs, through
    BatchNorm buffers and a flatten of a 4x4 map): where the teacher ignores its extra channels,
    the inherited student is the same function."""
    teacher, student = _pair(teacher_arch, student_arch)
    for m in teacher.modules():  # non-trivial running statistics, so the buffers are tested too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    _ignore_channels_past_the_student(teacher, student)
    side = 32 if teacher_arch == "lenet5" else 8
    x = torch.randn(16, 1, side, side)
    assert not torch.allclose(student(x), teacher(x), atol=1e-3)
    start_student(student, teacher, "teacher")
    torch.testing.assert_close(student(x), teacher(x), atol=1e-5, rtol=1e-5)


def test_the_student_gets_the_leading_slices():
    teacher, student = _pair("lenet5", "lenet5_half")
    start_student(student, teacher, "teacher")
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["features.0.weight"], t["features.0.weight"][:3])
    assert torch.equal(s["features.4.weight"], t["features.4.weight"][:8, :3])
    assert torch.equal(s["features.1.running_var"], t["features.1.running_var"][:3])
    assert torch.equal(s["fc.weight"], t["fc.weight"][:, :42])
    assert torch.equal(s["fc.bias"], t["fc.bias"])


def test_a_shallower_student_takes_the_leading_blocks():
    teacher, student = _pair("resnet56", "resnet20")
    start_student(student, teacher, "teacher")
    t = teacher.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(value, t[name]), name
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_random_leaves_the_student_as_built():
    teacher, student = _pair("lenet5", "lenet5_half")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    start_student(student, teacher, "random")
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("teacher_arch, student_arch, named", [
    ("lenet5_half", "lenet5", "features.0.weight, features.1.weight, features.1.bias and"),
    ("lenet5", "digits_cnn_quarter", "features.0.weight"),  # a 3x3 kernel is no slice of a 5x5
])
def test_a_student_that_is_no_slimmer_copy_is_a_one_line_error(teacher_arch, student_arch, named):
    teacher, student = _pair(teacher_arch, student_arch)
    with pytest.raises(DfkdError, match="slimmer copy") as err:
        start_student(student, teacher, "teacher")
    assert named in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DfkdError,
                       match="unknown student_init 'pruned'; choose one of: auto, random, teacher"):
        start_student(student, teacher, "pruned")


def test_auto_inherits_where_the_student_fits_and_starts_random_where_not():
    teacher, student = _pair("lenet5", "lenet5_half")
    assert start_student(student, teacher, "auto") == "teacher"
    assert torch.equal(student.state_dict()["fc.bias"], teacher.state_dict()["fc.bias"])
    teacher, student = _pair("lenet5", "digits_cnn_quarter")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert start_student(student, teacher, "auto") == "random"
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def _run(teacher, out, method, **kw):
    cfg = DistillConfig(teacher=TeacherArgs(path=str(teacher)), method=method,
                        method_options={"batch_size": 32, "steps": 2} if method == "deepinv"
                        else {"dataset": "digits", "batch_size": 32},
                        student="digits_cnn_quarter", out=str(out), budget="1steps",
                        device="cpu", eval_dataset="digits", eval_points=1, batch_size=32,
                        steps_per_round=10, **kw)
    return distill(cfg, progress=False)


def _weights(run_dir):
    return {k: v for k, v in load_file(str(run_dir / "student.safetensors")).items()
            if k.endswith("weight")}


def test_distill_starts_the_student_from_the_teacher(digits_teacher, tmp_path):
    """After one step at a negligible learning rate, the student's weights are still the leading
    slices of the teacher's; the report says where the student started; scratch_real, the
    no-teacher anchor, starts random."""
    teacher = load_file(str(digits_teacher / "teacher.safetensors"))
    inherited = _run(digits_teacher, tmp_path / "t", "deepinv", student_init="teacher", lr=1e-9)
    fresh = _run(digits_teacher, tmp_path / "r", "deepinv", student_init="random", lr=1e-9)
    assert inherited["student_init"] == "teacher" and fresh["student_init"] == "random"
    for run, report in ((tmp_path / "t", inherited), (tmp_path / "r", fresh)):
        first = next(r for r in read_jsonl(run / "metrics.jsonl") if "student_acc" in r)
        assert first["step"] == 0 and first["student_acc"] == report["student_init_acc"]
    for run, close in ((tmp_path / "t", True), (tmp_path / "r", False)):
        for name, value in _weights(run).items():
            cut = teacher[name][tuple(slice(0, n) for n in value.shape)]
            assert torch.allclose(value, cut, atol=1e-6) == close, (run.name, name)
    scratch = _run(digits_teacher, tmp_path / "s", "scratch_real", student_init="teacher")
    assert scratch["student_init"] == "random"
    auto = _run(digits_teacher, tmp_path / "a", "deepinv", lr=1e-9)  # auto, the default
    assert auto["student_init"] == "teacher"
    inherited_weights = _weights(tmp_path / "t")
    assert all(torch.equal(v, inherited_weights[k]) for k, v in _weights(tmp_path / "a").items())
