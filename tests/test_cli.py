"""The command line as users meet it: outputs, run directories and one-line errors."""

import json

import pytest
import torch

from dfkd.cli import main
from dfkd.config import DistillConfig, TeacherArgs


def _ok(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfkd: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_methods_and_models_are_listed(capsys):
    out = _ok(capsys, "methods")
    assert "deepinv" in out and "transfer_set" in out and "noise" in out and "online" in out
    assert out.splitlines()[0].split()[:2] == [DistillConfig.method, "default"]  # its rule
    assert "MFLOPs per image" in out.splitlines()[0]
    assert "lra" in out and "update" in out
    table = _ok(capsys, "methods", "--markdown").splitlines()
    assert table[0] == "| method | family | what it does |"
    assert [r for r in table if "(default)" in r] == [table[2]]
    assert table[2].startswith(f"| `{DistillConfig.method}` (default) | chosen from the teacher")
    out = _ok(capsys, "models")
    assert "lenet5_half" in out and "generator_32" in out


def test_train_distill_synthesize_evaluate(capsys, tmp_path, digits_teacher):
    t = tmp_path / "t"
    out = _ok(capsys, "train-teacher", "--dataset", "digits", "--model", "digits_cnn_quarter",
              "--epochs", "1", "--out", str(t), "--no-progress")
    assert "test accuracy" in out and (t / "teacher.safetensors").exists()
    assert (t / "report.json").exists() and (t / "config.yaml").exists()

    s = tmp_path / "s"
    out = _ok(capsys, "distill", "--teacher", str(digits_teacher), "--method", "deepinv",
              "--set", "steps=3", "--set", "batch_size=16", "--student", "digits_cnn_quarter",
              "--budget", "12steps", "--steps-per-round", "6", "--out", str(s), "--no-progress")
    assert "deepinv: student" in out
    report = json.loads((s / "report.json").read_text())
    assert report["dataset"] == "digits"  # the teacher's own dataset, recorded at training
    assert report["method_options"]["steps"] == 3 and report["synthesis_rounds"] == 2
    assert "--set steps=3" in (s / "command.txt").read_text()

    out = _ok(capsys, "evaluate", "--model", str(s), "--teacher", str(digits_teacher), "--json")
    result = json.loads(out)
    assert result["acc"] == pytest.approx(report["student_acc"])
    assert result["agreement"] == pytest.approx(report["agreement"])
    # the same teacher as a bare state dict, the way other projects publish weights
    from dfkd.models.classifier import load_classifier

    teacher = load_classifier(digits_teacher)
    torch.save({"state_dict": teacher.net.state_dict()}, tmp_path / "bare.pth")
    spec = [",".join(map(str, v)) for v in (teacher.spec.mean, teacher.spec.std)]
    out = _ok(capsys, "evaluate", "--model", str(s), "--teacher", str(tmp_path / "bare.pth"),
              "--teacher-arch", "digits_cnn", "--teacher-mean", spec[0], "--teacher-std", spec[1],
              "--json")
    assert json.loads(out)["agreement"] == pytest.approx(report["agreement"])

    ts = tmp_path / "set"
    out = _ok(capsys, "synthesize", "--teacher", str(digits_teacher), "--set", "steps=2",
              "--set", "batch_size=10", "--num", "25", "--out", str(ts), "--channels-last",
              "--no-progress")
    assert "30 samples" in out and (ts / "samples.png").exists()
    assert json.loads((ts / "meta.json").read_text())["accel"] == "fp32+channels_last"
    out = _ok(capsys, "distill", "--teacher", str(digits_teacher), "--transfer-set", str(ts),
              "--student", "digits_cnn_quarter", "--budget", "5steps", "--out",
              str(tmp_path / "s2"), "--precision", "bf16", "--student-init", "teacher",
              "--no-progress")
    report = json.loads((tmp_path / "s2" / "report.json").read_text())
    assert report["method"] == "deepinv" and report["accel"] == "bf16"
    assert report["student_init"] == "teacher"


def test_distill_from_config_file_with_overrides(capsys, tmp_path, digits_teacher):
    s = tmp_path / "s"
    _ok(capsys, "distill", "--teacher", str(digits_teacher), "--method", "noise", "--student",
        "digits_cnn_quarter", "--budget", "4steps", "--out", str(s), "--no-progress")
    _ok(capsys, "distill", "--teacher", str(digits_teacher), "--config", str(s / "config.yaml"),
        "--out", str(tmp_path / "s2"), "--seed", "3", "--no-progress")
    report = json.loads((tmp_path / "s2" / "report.json").read_text())
    assert report["method"] == "noise" and report["seed"] == 3 and report["steps"] == 4
    # the config names the teacher: no --teacher needed, and a spec flag alone amends it
    _ok(capsys, "distill", "--config", str(s / "config.yaml"), "--out", str(tmp_path / "s3"),
        "--num-classes", "10", "--no-progress")
    report = json.loads((tmp_path / "s3" / "report.json").read_text())
    assert report["teacher"] == str(digits_teacher) and report["steps"] == 4
    assert "num_classes: 10" in (tmp_path / "s3" / "config.yaml").read_text()
    err = _error(capsys, "distill", "--method", "noise", "--out", str(tmp_path / "s4"))
    assert err == "dfkd: error: --teacher is required (or --config with a config that names it)"


def test_bad_augmentation_in_a_config_file_fails_before_any_work(capsys, tmp_path,
                                                                digits_teacher):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("method: deepinv\naugment: rotate\n")
    err = _error(capsys, "distill", "--teacher", str(digits_teacher), "--config", str(cfg),
                 "--student", "digits_cnn_quarter", "--out", str(tmp_path / "s"))
    assert "unknown augmentation 'rotate'" in err
    assert not (tmp_path / "s").exists()  # refused before the run directory or a synthesis round


def test_quickstart_end_to_end_small(capsys, tmp_path):
    out = _ok(capsys, "quickstart", "--out", str(tmp_path / "q"), "--budget", "20steps",
              "--teacher-epochs", "1", "--no-progress")
    assert "student (digits_cnn_quarter, no data)" in out and "agreement" in out
    assert (tmp_path / "q" / "student" / "report.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["distill", "--teacher", "{t}", "--method", "magic", "--student", "digits_cnn_quarter",
      "--out", "{o}"],
     "unknown method 'magic'"),
    (["distill", "--teacher", "{t}", "--student", "lenet9", "--out", "{o}"],
     "unknown model 'lenet9'"),
    (["distill", "--teacher", "{o}/nothing", "--student", "lenet5", "--out", "{o}"],
     "does not exist"),
    (["distill", "--teacher", "{notes}", "--arch", "lenet5", "--student", "lenet5_half",
      "--out", "{o}"], "is not a weights file"),
    (["distill", "--teacher", "{t}", "--student", "lenet5_half", "--out", "{o}"],
     "cannot take input 1x8x8"),
    (["distill", "--teacher", "{t}", "--student", "digits_cnn_quarter", "--budget", "soon",
      "--out", "{o}"], "cannot read budget"),
    (["train-teacher", "--dataset", "mnist", "--data-root", "{o}", "--model", "lenet5",
      "--out", "{o}/t"], "missing train-images-idx3-ubyte"),
    (["evaluate", "--model", "{t}", "--dataset", "cifar10", "--data-root", "{o}"],
     "cifar10"),
])
def test_bad_input_gets_one_line_errors(capsys, tmp_path, digits_teacher, argv, message,
                                        monkeypatch):
    monkeypatch.setenv("DFKD_DATA", str(tmp_path / "cache"))
    notes = tmp_path / "notes.pt"
    notes.write_text("not weights")
    argv = [a.format(t=digits_teacher, o=tmp_path, notes=notes) for a in argv]
    assert message in _error(capsys, *argv, *(["--no-progress"] if argv[0] != "evaluate" else []))


CONFIGS = {"distill": "dfkd.config:DistillConfig",
           "train-teacher": "dfkd.commands.train_teacher:TeacherConfig",
           "synthesize": "dfkd.commands.synthesize:SynthesizeConfig",
           "quantize": "dfkd.commands.quantize:QuantizeConfig",
           "bench": "dfkd.commands.bench:BenchConfig", "fed": "dfkd.fed.task:FedConfig",
           "serve": "dfkd.commands.serve:ServeConfig"}


@pytest.mark.parametrize("command", CONFIGS)
def test_every_option_field_is_one_flag_that_reaches_its_field(command):
    """Flags come from the config fields declared with `option`: each such field has exactly
    one flag, a value given on the command line lands in that field with the field's type, and
    a flag left out keeps the config's value."""
    import dataclasses
    import importlib
    import typing

    from dfkd.cli import _flags, build_parser
    from dfkd.config import TeacherArgs

    module, name = CONFIGS[command].split(":")
    cls = getattr(importlib.import_module(module), name)
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions[0].choices.items()
               if a[0] == command)[1]
    dests = {a.dest for a in sub._actions}
    hints = typing.get_type_hints(cls)
    sources = [f.name for f in dataclasses.fields(cls) if hints[f.name] is TeacherArgs]
    required = [f"--{sources[0]}", "t"] if sources else []
    assert _flags(sub.parse_args(required), cls).keys() == set(sources)  # the rest left out
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli")
        assert (meta is not None) == (f.name in dests), f.name
        if meta is None or hints[f.name] is TeacherArgs:
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)),
                    hints[f.name])
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        given, expected = {bool: ([flag], True), int: ([flag, "7"], 7),
                           float: ([flag, "0.5"], 0.5), dict: ([flag, "a.k=1"], {"a.k": "1"}),
                           list[int]: ([flag, "3,8,8"], [3, 8, 8]),
                           list[float]: ([flag, "0.5,0.25"], [0.5, 0.25])}.get(
            kind, ([flag, meta["choices"][-1] if meta["choices"] else "x"], None))
        flags = _flags(sub.parse_args([*required, *given]), cls)
        if expected is None:
            expected = given[-1]
        assert flags[f.name] == expected, f.name


def test_teacher_flags_build_the_teacher_source():
    from dfkd.cli import _flags, build_parser

    args = build_parser().parse_args(["distill", "--teacher", "w.pt", "--arch", "lenet5",
                                      "--mean", "0.5", "--input-shape", "1,28,28"])
    teacher = _flags(args, DistillConfig)["teacher"]
    assert (teacher.path, teacher.arch, teacher.mean, teacher.input_shape, teacher.std) == \
        ("w.pt", "lenet5", [0.5], [1, 28, 28], None)


def test_compile_is_on_off_or_left_to_the_rule():
    from dfkd.cli import _flags, build_parser

    def parsed(*extra):
        args = build_parser().parse_args(["distill", "--teacher", "w.pt", *extra])
        return _flags(args, DistillConfig).get("compile", "unset")

    assert (parsed(), parsed("--compile"), parsed("--no-compile")) == ("unset", True, False)
    assert DistillConfig(teacher=TeacherArgs(path="w.pt")).compile is None  # the rule decides
