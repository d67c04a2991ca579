"""The throughput suite and the accelerator settings it times (tiny cases: LeNet-5, batch 4)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from dfkd.accel import Accel
from dfkd.commands.throughput import (
    default_settings,
    run_throughput,
    set_bn_statistics,
    throughput_markdown,
    throughput_teacher,
    transfer_set_methods,
)
from dfkd.errors import DfkdError
from dfkd.hooks import BNStatsHook, bn_layers
from dfkd.synthesis import base, create_synthesizer
from dfkd.synthesis.base import Options, Synthesizer

TINY = {"steps": 1, "batch_size": 4, "models": ("lenet5",), "progress": False}
KEYS = {"device", "device_name", "setting", "model", "input_shape", "method", "batch_size",
        "steps", "seconds", "image_iters_per_s", "teacher_passes_per_s", "threads", "torch"}


def _check_rates(records):
    for r in records:
        assert KEYS <= set(r), r
        for key in ("seconds", "image_iters_per_s", "teacher_passes_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)


def test_run_throughput_writes_json_and_markdown(tmp_path):
    records = run_throughput(tmp_path, methods=["deepinv"], settings=[("cpu", Accel())], **TINY)
    assert len(records) == 1
    _check_rates(records)
    r = records[0]
    assert (r["device"], r["setting"], r["model"], r["method"]) == ("cpu", "fp32", "lenet5",
                                                                    "deepinv")
    assert r["input_shape"] == [1, 32, 32] and r["batch_size"] == 4 and r["steps"] == 1
    assert r["threads"] == torch.get_num_threads() and r["torch"] == torch.__version__
    assert json.loads((tmp_path / "throughput.json").read_text()) == records
    md = (tmp_path / "throughput.md").read_text()
    assert md == throughput_markdown(records)
    assert f"torch {torch.__version__}" in md and "| cpu | fp32 | lenet5 | deepinv |" in md


def test_defaults_cover_transfer_set_methods_and_cpu():
    methods = transfer_set_methods()
    assert "deepinv" in methods and "noise" not in methods
    assert default_settings()[0] == ("cpu", Accel())
    assert all(not a.compile for _, a in default_settings(compile=False))


class _Failing(Synthesizer):
    """Test method whose construction fails like a misconfigured one."""

    name, family = "test_failing", "transfer_set"

    def __init__(self, teacher, options, seed):
        raise DfkdError("test_failing cannot run on this teacher")


@dataclass
class _OneShotOptions(Options):
    batch_size: int = 8


class _OneShot(Synthesizer):
    """Test method with no `steps` option: one teacher pass a round."""

    name, family, Options = "test_oneshot", "transfer_set", _OneShotOptions

    def synthesize(self, student, index):
        gen = self.rng(index)
        x = torch.rand((self.opts.batch_size, *self.teacher.spec.shape), generator=gen,
                       device=self.device)
        n = x.shape[0]
        return {"x": x, "target_logits": self.label(x), "classes": torch.full((n,), -1),
                "seeds": torch.zeros(n, dtype=torch.long)}


def test_errors_are_recorded_and_methods_without_steps_run(tmp_path, monkeypatch):
    monkeypatch.setitem(base._METHODS, "test_failing", _Failing)
    monkeypatch.setitem(base._METHODS, "test_oneshot", _OneShot)
    records = run_throughput(tmp_path, methods=["test_failing", "test_oneshot"],
                             settings=[("cpu", Accel())], **TINY)
    failed, ok = records
    assert failed["error"] == "test_failing cannot run on this teacher"
    assert "seconds" not in failed
    _check_rates([ok])
    assert ok["batch_size"] == 4 and ok["steps"] == 1
    assert "test_failing cannot run" in (tmp_path / "throughput.md").read_text()
    with pytest.raises(DfkdError, match="unknown method"):
        run_throughput(tmp_path, methods=["nope"], **TINY)


def test_set_bn_statistics_sets_running_stats_and_restores_state():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 6),
                              torch.nn.BatchNorm1d(6))
    set_bn_statistics(net, (1, 32, 32), batches=2, batch_size=8,
                      generator=torch.Generator().manual_seed(0))
    assert not net.training
    assert [m.momentum for m in bn_layers(net)] == [0.3, 0.1]
    for m in bn_layers(net):
        assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
        assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
        assert int(m.num_batches_tracked) == 2


def test_bn_hook_reduces_bf16_input_in_float32():
    """bf16 keeps 8 bits: a batch mean of 100.1 would round to 100.0 and hide the mismatch."""
    bn = torch.nn.BatchNorm2d(1).eval()
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(0.04)
    x = torch.full((10, 1, 2, 2), 100.0)
    x[:2] = 100.5  # mean 100.1, biased variance 0.04, all values exact in bf16
    hook = BNStatsHook(bn)
    hook._hook(bn, (x.bfloat16(),), None)
    assert hook.loss.dtype == torch.float32
    assert float(hook.loss) == pytest.approx(0.1, abs=1e-3)
    bn(x)
    assert float(hook.loss) == pytest.approx(0.1, abs=1e-3)  # fp32 path unchanged
    hook.remove()


def _bn_losses(teacher, accel, x):
    synth = create_synthesizer("deepinv", teacher, {"batch_size": 4, "steps": 1}, seed=0)
    with accel.autocast("cpu"):
        logits = teacher.net(x)
    losses = [h.loss for h in synth.bn_hooks]
    for h in synth.bn_hooks:
        h.remove()
    return logits, losses


def test_bf16_autocast_keeps_bn_prior_in_float32():
    teacher = throughput_teacher("lenet5", torch.device("cpu"))
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    logits32, ref = _bn_losses(teacher, Accel(), x)
    logits16, got = _bn_losses(teacher, Accel("bf16"), x)
    assert logits16.dtype == torch.bfloat16 and logits32.dtype == torch.float32
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in got)
    assert float(sum(got)) == pytest.approx(float(sum(ref)), rel=0.05)


def test_channels_last_prepare_keeps_outputs():
    teacher = throughput_teacher("lenet5", torch.device("cpu"))
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    before = teacher(x)
    Accel("fp32", channels_last=True).prepare(teacher)
    assert teacher.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(teacher(x), before, rtol=1e-4, atol=1e-5)


def test_accel_labels_and_unknown_precision():
    assert Accel().label == "fp32"
    assert Accel("bf16", True).label == "bf16+channels_last"
    assert Accel("bf16", True, True).label == "bf16+channels_last+compile"
    with pytest.raises(DfkdError, match="unknown precision 'fp16'; choose one of: fp32, bf16"):
        Accel("fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_settings_on_lenet5(tmp_path):
    settings = [s for s in default_settings() if s[0] == "cuda"]
    records = run_throughput(tmp_path, methods=["deepinv"], settings=settings, **TINY)
    assert [r["setting"] for r in records] == ["fp32", "bf16+channels_last"]
    _check_rates(records)
    assert all(r["device_name"] == torch.cuda.get_device_name() for r in records)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit inside dynamo
def test_compile_keeps_bn_hooks_firing():
    """Dynamo traces the BN hooks into the graph, also hooks added after the first call."""
    teacher = throughput_teacher("lenet5", torch.device("cpu"))
    eager_net = teacher.net
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    Accel(compile=True).prepare(teacher)
    assert teacher.net is not eager_net
    with torch.no_grad():
        teacher.net(x)  # compiled before any hook exists
    synth = create_synthesizer("deepinv", teacher, {"batch_size": 4, "steps": 2}, seed=0)
    compiled = teacher.net(x)
    got = [h.loss.detach().clone() for h in synth.bn_hooks]
    for h in synth.bn_hooks:
        h.loss = None
    torch.testing.assert_close(compiled, eager_net(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, [h.loss for h in synth.bn_hooks], rtol=1e-4, atol=1e-4)
    batch = synth.synthesize(None, 0)
    assert torch.isfinite(batch["x"]).all() and synth.teacher_passes == 4 * 2 + 4


def test_the_students_training_view_is_compiled_only_when_asked():
    student = throughput_teacher("lenet5", torch.device("cpu"))
    assert Accel().training_view(student) is student
    view = Accel(compile=True).training_view(student)
    assert view is not student and view._orig_mod is student  # compiled lazily, on first call
    assert [p for p in view.parameters()] == [p for p in student.parameters()]
