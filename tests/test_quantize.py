import json
import math

import pytest
import safetensors.torch
import torch
from torch import nn

from dfkd.cli import main
from dfkd.errors import DfkdError
from dfkd.hooks import BNStatsHook, gaussian_kl
from dfkd.models.classifier import (
    Classifier,
    InputSpec,
    load_classifier,
    new_classifier,
    save_classifier,
)
from dfkd.quant import pt2e as quant
from dfkd.quant.calibration import calibration_method, make_calibration
from dfkd.quant.qat import FinetuneOptions, finetune
from dfkd.synthesis import create_synthesizer

pytest.importorskip("torchao")

FAST = {"batch_size": 16, "steps": 5}


@pytest.fixture
def model(digits_teacher):
    return load_classifier(digits_teacher).eval().requires_grad_(False)


@pytest.fixture
def real(model):
    return make_calibration("real", model, 128, 0).x


def test_gaussian_kl_golden_values():
    one, zero = torch.ones(1), torch.zeros(1)
    assert gaussian_kl(zero, one, zero, one).item() == 0
    assert gaussian_kl(one, one, zero, one).item() == pytest.approx(0.5)
    assert gaussian_kl(zero, 4 * one, zero, one).item() == pytest.approx(
        0.5 * (math.log(1 / 4) + 4 - 1))


def test_bn_hook_kl_is_zero_on_the_stored_statistics_and_refuses_unknown_distances():
    bn = nn.BatchNorm1d(3, eps=0.0).eval()
    hook = BNStatsHook(bn, "kl")
    x = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0))
    bn.running_mean.copy_(x.mean(0))
    bn.running_var.copy_(x.var(0, unbiased=False))
    bn(x)
    assert hook.loss.item() == pytest.approx(0, abs=1e-6)
    bn(2 * x + 1)
    assert hook.loss.item() > 0.5
    with pytest.raises(DfkdError, match="unknown BatchNorm distance 'l1'; choose one of: l2, kl"):
        BNStatsHook(bn, "l1")


def test_int4_packing_round_trips():
    t = torch.tensor([[-8, 7, 0], [1, -1, 5]], dtype=torch.int8)
    packed = quant.pack_int4(t)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(quant.unpack_int4(packed, (2, 3)), t)


def safe_open_metadata(data: bytes) -> dict:
    """The metadata of safetensors bytes (its JSON header's __metadata__)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_every_scheme_keeps_the_model_and_shrinks_its_weights(model, real, scheme, tmp_path):
    q = quant.quantize_static(model, scheme, real)
    x = real[:64]
    agree = (quant.predict(q, x).argmax(1) == quant.predict(model, x).argmax(1)).float().mean()
    assert agree >= 0.95
    weights = quant.constants(q)
    ratio = quant.bytes_on_disk(quant.float_constants(model)) / quant.bytes_on_disk(weights,
                                                                                  scheme)
    assert ratio > (6 if scheme == "int4-weight" else 3.5)
    assert not any(t.dtype == torch.float32 and t.numel() > 1000 for t in weights.values())
    data = quant.serialize(weights, scheme, {"scheme": scheme})
    stored, meta = safetensors.torch.load(data), safe_open_metadata(data)
    shapes = json.loads(meta.get("int4_shapes", "{}"))
    assert bool(shapes) == (scheme == "int4-weight")
    restored = {k: quant.unpack_int4(t, tuple(shapes[k])) if k in shapes else t
                for k, t in stored.items()}
    assert restored.keys() == weights.keys()
    assert all(torch.equal(restored[k], weights[k]) for k in weights)
    path = tmp_path / "q.pt2"
    quant.save_program(q, model.spec.shape, path)
    again = quant.load_program(path)
    assert torch.equal(quant.predict(again, x[:7]), quant.predict(q, x[:7]))  # any batch size
    size = quant.save_quantized(q, model, tmp_path / "q.safetensors", scheme, qat=False)
    assert size == (tmp_path / "q.safetensors").stat().st_size
    rebuilt = quant.load_quantized(tmp_path / "q.safetensors")
    assert torch.equal(quant.predict(rebuilt, x), quant.predict(q, x))


def test_load_quantized_refuses_other_files(model, tmp_path):
    save_classifier(model, tmp_path / "float.safetensors")
    with pytest.raises(DfkdError, match="not a quantized model written by dfkd quantize"):
        quant.load_quantized(tmp_path / "float.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DfkdError, match="not a readable safetensors file"):
        quant.load_quantized(tmp_path / "junk.safetensors")


def test_static_calibration_decides_the_ranges(model, real):
    noise = make_calibration("gaussian", model, 128, 0).x
    a = quant.predict(quant.quantize_static(model, "int8-static", real), real)
    b = quant.predict(quant.quantize_static(model, "int8-static", noise), real)
    assert not torch.equal(a, b)
    c = quant.predict(quant.quantize_static(model, "int8-dynamic", real), real)
    d = quant.predict(quant.quantize_static(model, "int8-dynamic", noise), real)
    assert torch.equal(c, d)  # dynamic: ranges measured at run time, calibration is moot


def test_unknown_scheme_and_unexportable_model_are_one_line_errors(model):
    with pytest.raises(DfkdError, match="unknown scheme 'int2'"):
        quant.quantizer("int2")

    class Branchy(nn.Module):
        def forward(self, x):
            return x[:, :10, 0, 0] if x.sum() > 0 else -x[:, :10, 0, 0]

    branchy = Classifier(Branchy(), InputSpec((1, 8, 8), (0.5,), (0.5,), 10), "branchy")
    with pytest.raises(DfkdError, match="torch.export could not capture the model"):
        quant.export_float(branchy)


def test_calibration_sources_and_their_errors(model):
    assert calibration_method("gaussian") == ("noise", {})
    assert calibration_method("inception") == ("deepinv", {"bn_weight": 0.0})
    assert calibration_method("mvn") == ("mvn", {})
    with pytest.raises(DfkdError, match="online .* method"):
        calibration_method("dafl")
    with pytest.raises(DfkdError, match="the real-data calibration is 'real'"):
        calibration_method("kd_real")
    with pytest.raises(DfkdError, match="unknown method 'nope'"):
        calibration_method("nope")
    cal = make_calibration("bns", model, 20, 0, options=FAST)
    assert cal.x.shape == (20, *model.spec.shape) and cal.method == "bns"
    assert 0 <= cal.x.min() and cal.x.max() <= 1
    assert not model.net._forward_hooks and all(
        not m._forward_hooks for m in model.modules())  # the synthesizer hooked a copy


def test_bns_lowers_the_batchnorm_mismatch_and_draws_no_classes(model):
    short = create_synthesizer("bns", model, {**FAST, "steps": 1}, 0).synthesize(None, 0)
    long = create_synthesizer("bns", model, {**FAST, "steps": 40}, 0).synthesize(None, 0)
    hooks = [BNStatsHook(m, "kl") for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.enable_grad():
        model(short["x"])
        before = sum(h.loss for h in hooks).item()
        model(long["x"])
        after = sum(h.loss for h in hooks).item()
    for h in hooks:
        h.remove()
    assert after < 0.5 * before
    assert (long["classes"] == -1).all()


def test_mixmix_inverts_extra_teachers_and_checks_them(model, digits_teacher, tmp_path):
    synth = create_synthesizer("mixmix", model, {**FAST, "extra_teachers": str(digits_teacher)},
                               0)
    batch = synth.synthesize(None, 0)
    assert synth.report()["models_inverted"] == 2
    assert synth.teacher_passes >= 2 * FAST["batch_size"] * FAST["steps"]
    assert batch["classes"].min() >= 0
    other = new_classifier("lenet5", InputSpec((1, 32, 32), (0.5,), (0.5,), 10))
    save_classifier(other, tmp_path / "other.safetensors")
    with pytest.raises(DfkdError, match="extra teacher .* takes \\(1, 32, 32\\) inputs"):
        create_synthesizer("mixmix", model, {"extra_teachers": str(tmp_path / "other.safetensors")},
                           0)


def test_mixmix_takes_a_published_checkpoint_named_with_its_architecture(model, tmp_path):
    published = tmp_path / "other.th"  # as published: nested, DataParallel's prefix, no spec
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                           for k, v in model.net.state_dict().items()}},
               published)
    with pytest.raises(DfkdError, match="write it as .*other.th@ARCH in extra_teachers"):
        create_synthesizer("mixmix", model, {**FAST, "extra_teachers": str(published)}, 0)
    synth = create_synthesizer("mixmix", model,
                               {**FAST, "extra_teachers": f"{published}@{model.arch}"}, 0)
    assert synth.report()["models_inverted"] == 2
    extra = synth.models[1]
    assert (extra.spec.mean, extra.spec.std) == (model.spec.mean, model.spec.std)
    pixels = torch.rand(4, *model.spec.shape)
    assert torch.allclose(extra(pixels), model(pixels))


@pytest.mark.parametrize(("loss", "scheme"), [("kd", "int8-static"), ("fa", "int4-weight")])
def test_qat_finetune_lowers_its_loss_and_leaves_the_float_model_alone(model, real, loss,
                                                                       scheme, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = quant.prepare_qat(model, scheme)
    quant.observe(prepared, real)
    nodes = len(prepared.graph.nodes)
    stats = finetune(prepared, model, real, FinetuneOptions(loss=loss, steps=30), 0)
    assert stats["steps"] == 30 and stats["last_loss"] < stats["first_loss"]
    assert len(prepared.graph.nodes) == nodes  # feature taps removed again
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q = quant.convert(prepared)
    agree = (quant.predict(q, real).argmax(1) == quant.predict(model, real).argmax(1))
    assert agree.float().mean() >= 0.95
    if scheme == "int8-static":  # a QAT graph is rebuilt through the QAT flow
        quant.save_quantized(q, model, tmp_path / "q.safetensors", scheme, qat=True)
        rebuilt = quant.load_quantized(tmp_path / "q.safetensors")
        assert torch.equal(quant.predict(rebuilt, real), quant.predict(q, real))


def test_missing_torchao_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(DfkdError, match=r"pip install 'dfkd\[quant\]'"):
        quant.require_torchao()


def test_cli_quantize_end_to_end(digits_teacher, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(digits_teacher), "--calibration", "bns,gaussian",
               "--calibration-size", "32", "--set", "bns.steps=3", "--set", "batch_size=16",
               "--finetune", "kd", "--finetune-steps", "4", "--latency-batch", "8",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    for key in ("calibration", "scheme", "fp32_acc", "quant_acc", "fp32_bytes", "quant_bytes",
                "latency_ms_fp32", "latency_ms_quant"):
        assert r[key] is not None, key
    assert r["calibration"] == "bns" and r["scheme"] == "int8-static"
    assert [row["calibration"] for row in r["rows"]] == ["bns", "gaussian", "real"]
    assert 0 <= r["quant_acc"] <= 1 and r["real_calibration_acc"] is not None
    assert r["fp32_bytes"] > 3 * r["quant_bytes"]
    assert (out / "quantized.safetensors").stat().st_size == r["quant_bytes"]
    assert (out / "quantized.pt2").stat().st_size == r["quant_program_bytes"]
    assert (out / "samples.png").exists() and "size on disk" in (out / "report.md").read_text()
    program = quant.load_program(out / "quantized.pt2")
    x = torch.rand(3, 1, 8, 8)
    assert program(x).shape == (3, 10)
    assert "int8-static (bns)" in capsys.readouterr().out
    assert main(["quantize", "--model", str(digits_teacher), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["quantize", "--model", str(digits_teacher), "--calibration", "dafl",
                 "--out", str(tmp_path / "x")]) == 2
    assert "online (generator) method" in capsys.readouterr().err
    assert main(["quantize", "--model", str(digits_teacher), "--set", "mvn.steps=3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--set names source(s) mvn that --calibration does not list" in capsys.readouterr().err
