"""The command line as users meet it: outputs, run directories and one-line errors."""

import json

import pytest

from dfkd.cli import main
from dfkd.config import DistillConfig


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
    marked = [line.split()[0] for line in out.splitlines() if line.split()[:1] and
              line.split()[0].endswith("*")]
    assert marked == [f"{DistillConfig.method}*"]  # the one default, marked
    assert "lra" in out and "update" in out
    table = _ok(capsys, "methods", "--markdown").splitlines()
    assert table[0] == "| method | family | what it does |"
    assert [r for r in table if "(default)" in r] == [
        next(r for r in table if r.startswith(f"| `{DistillConfig.method}`"))]
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
