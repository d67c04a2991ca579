import pytest
import torch
from safetensors.torch import load_file

import dfkd.commands.train_teacher as train
from dfkd.commands.train_teacher import TeacherConfig, train_teacher
from dfkd.errors import DfkdError


def _cfg(out):
    return TeacherConfig(dataset="digits", model="digits_cnn_quarter", out=str(out), epochs=2,
                         device="cpu")


def test_killed_teacher_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full = train_teacher(_cfg(tmp_path / "full"), progress=False)
    assert 0.3 < full["test_acc"] <= 1.0 and (tmp_path / "full" / "teacher.safetensors").exists()

    class Killed(BaseException):
        pass

    original = train.save_checkpoint

    def save_then_die(*a, **k):
        original(*a, **k)
        raise Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_teacher(_cfg(tmp_path / "killed"), progress=False)
    monkeypatch.undo()
    with pytest.raises(DfkdError, match="add --resume"):
        train_teacher(_cfg(tmp_path / "killed"), progress=False)
    resumed = train_teacher(_cfg(tmp_path / "killed"), resume=True, progress=False)
    assert resumed["test_acc"] == full["test_acc"]
    a = load_file(str(tmp_path / "full" / "teacher.safetensors"))
    b = load_file(str(tmp_path / "killed" / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
