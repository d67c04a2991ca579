"""`--method auto` and an unset `--compile`: chosen from the teacher by its inversion cost, or by
its API."""

import torch

import dfkd.engine.method_choice as method_choice
from dfkd.blackbox.teacher import BlackBoxTeacher, LocalAPI
from dfkd.commands.bench import resolve_methods, suite_default
from dfkd.commands.suites import SUITES
from dfkd.config import Budget, DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.engine.method_choice import (
    CHEAP_INVERSION_FLOPS,
    MIN_COMPILE_FLOPS,
    choose_compile,
    choose_method,
    choose_transfer_set_method,
    inversion_flops,
)
from dfkd.models.classifier import InputSpec, load_classifier, new_classifier


def test_a_cheap_teacher_gets_deepinv_a_dear_one_nayer_an_api_its_own(digits_teacher):
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    method, why = choose_method(teacher)
    assert method == "deepinv" and "MFLOPs per image" in why
    assert inversion_flops(teacher) < CHEAP_INVERSION_FLOPS
    with torch.random.fork_rng():
        resnet = new_classifier("resnet20a", InputSpec((3, 32, 32), (0.5,), (0.5,), 10))
    assert choose_method(resnet.eval().requires_grad_(False))[0] == "nayer"
    assert choose_method(BlackBoxTeacher(LocalAPI(teacher)))[0] == "dfme"
    assert choose_method(BlackBoxTeacher(LocalAPI(teacher, access="top1")))[0] == "db3kd"
    # dfkd synthesize keeps a set: the same rule, and db3kd (not dfme) for an API
    assert choose_transfer_set_method(teacher)[0] == "deepinv"
    assert choose_transfer_set_method(BlackBoxTeacher(LocalAPI(teacher)))[0] == "db3kd"


def test_compile_is_chosen_for_a_dear_teacher_where_the_device_can_build(digits_teacher,
                                                                          monkeypatch):
    cpu = torch.device("cpu")
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    compiled, why = choose_compile(teacher, cpu)
    assert not compiled and "too little to repay compiling" in why
    assert choose_compile(BlackBoxTeacher(LocalAPI(teacher)), cpu)[0] is False
    with torch.random.fork_rng():
        resnet = new_classifier("resnet20a", InputSpec((3, 32, 32), (0.5,), (0.5,), 10))
    resnet = resnet.eval().requires_grad_(False)
    monkeypatch.setattr(method_choice, "compile_backend_missing", lambda device: "")
    assert choose_compile(resnet, cpu) == (True, choose_method(resnet)[1])
    # a clock too short to win the compiling back stays eager; a long one or a step budget not
    assert choose_compile(resnet, cpu, Budget.parse("2m")) == (
        False, "a budget under 5 minutes, too short to repay compiling")
    assert choose_compile(resnet, cpu, Budget.parse("5m"))[0] is True
    assert choose_compile(resnet, cpu, Budget.parse("100steps"))[0] is True
    monkeypatch.setattr(method_choice, "compile_backend_missing",
                        lambda device: "no C++ compiler found (set CXX)")
    compiled, why = choose_compile(resnet, cpu)
    assert not compiled and why == "no C++ compiler found (set CXX); the run stays eager"


def test_a_teacher_between_the_thresholds_inverts_per_sample_and_compiles(monkeypatch):
    with torch.random.fork_rng():
        resnet = new_classifier("resnet14a", InputSpec((1, 32, 32), (0.5,), (0.5,), 10))
    resnet = resnet.eval().requires_grad_(False)
    assert MIN_COMPILE_FLOPS < inversion_flops(resnet) <= CHEAP_INVERSION_FLOPS
    assert choose_method(resnet)[0] == "deepinv"
    monkeypatch.setattr(method_choice, "compile_backend_missing", lambda device: "")
    assert choose_compile(resnet, torch.device("cpu"))[0] is True


def test_the_backend_check_agrees_with_compiling():
    """The check says the CPU backend is missing exactly where inductor cannot build."""
    try:
        built = torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).sum().item() == 9
    except Exception:
        built = False
    assert (method_choice.compile_backend_missing(torch.device("cpu")) == "") == built


def test_the_inversion_cost_is_counted_once_per_teacher(digits_teacher, monkeypatch):
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    counted = []
    count = method_choice.count_flops
    monkeypatch.setattr(method_choice, "count_flops", lambda fn: counted.append(1) or count(fn))
    choose_method(teacher)
    choose_compile(teacher, torch.device("cpu"))
    assert inversion_flops(teacher) < CHEAP_INVERSION_FLOPS and len(counted) == 1
    other = load_classifier(digits_teacher).eval().requires_grad_(False)
    assert inversion_flops(other) == inversion_flops(teacher) and len(counted) == 2


def test_the_choice_leaves_the_random_state_alone(digits_teacher):
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    state = torch.get_rng_state()
    choose_method(teacher)
    assert torch.equal(torch.get_rng_state(), state)


def test_distill_without_a_method_reports_what_auto_chose(digits_teacher, tmp_path):
    cfg = DistillConfig(teacher=TeacherArgs(path=str(digits_teacher)),
                        method_options={"batch_size": 16, "steps": 2},
                        student="digits_cnn_quarter", out=str(tmp_path / "a"), budget="4steps",
                        device="cpu", eval_dataset="none", steps_per_round=2)
    assert cfg.method == "auto"
    r = distill(cfg, progress=False)
    assert r["method"] == "deepinv" and "MFLOPs per image" in r["method_choice"]
    assert r["accel"] == "fp32" and "too little to repay compiling" in r["compile_choice"]


def test_bench_default_is_what_auto_chooses_for_the_suite_teacher():
    assert suite_default(SUITES["digits"]) == "deepinv"
    assert suite_default(SUITES["mnist-mlp"]) == "deepinv"
    assert suite_default(SUITES["cifar10-r20"]) == "nayer"
    # the ResNets trained on MNIST (48 and 104 MFLOPs, counted at one channel) are under it
    assert suite_default(SUITES["mnist-r8"]) == "deepinv"
    assert suite_default(SUITES["mnist-r14"]) == "deepinv"
    assert resolve_methods("default,noise", "nayer") == ["kd_real", "scratch_real", "nayer",
                                                         "noise"]
