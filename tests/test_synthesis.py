import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfkd.errors import DfkdError
from dfkd.models.classifier import Classifier, InputSpec, load_classifier, new_classifier
from dfkd.synthesis import create_synthesizer, list_methods, method_class
from dfkd.synthesis.transfer_set import TransferSet

FAST = {"batch_size": 20, "steps": 30}


@pytest.fixture
def teacher(digits_teacher):
    return load_classifier(digits_teacher).eval().requires_grad_(False)


def test_registry_lists_every_method_with_a_description():
    methods = list_methods()
    assert {"deepinv", "adi", "noise"} <= set(methods)
    assert all(doc for doc in methods.values())
    with pytest.raises(DfkdError, match="unknown method 'nope'; choose one of: adi"):
        method_class("nope")


def test_options_are_checked_by_name_and_type(teacher):
    with pytest.raises(DfkdError, match="has no option 'stepz'; options: batch_size, steps"):
        create_synthesizer("deepinv", teacher, {"stepz": "3"}, 0)
    with pytest.raises(DfkdError, match="'steps' expects int, got 'many'"):
        create_synthesizer("deepinv", teacher, {"steps": "many"}, 0)
    with pytest.raises(DfkdError, match="flip must be true, false or auto"):
        create_synthesizer("deepinv", teacher, {"flip": "maybe"}, 0)
    assert create_synthesizer("adi", teacher, {}, 0).opts.comp_weight == 10.0


def test_deepinversion_batch_is_valid_reproducible_and_counts_passes(teacher):
    synth = create_synthesizer("deepinv", teacher, FAST, seed=3)
    batch = synth.synthesize(None, 0)
    assert batch["x"].shape == (20, 1, 8, 8)
    assert batch["x"].min() >= 0 and batch["x"].max() <= 1
    assert torch.equal(batch["x"], batch["x"].half().float())  # stored exactly as float16
    assert torch.allclose(batch["target_logits"], teacher(batch["x"]), atol=1e-5)
    assert sorted(batch["classes"].tolist()) == sorted(list(range(10)) * 2)
    assert synth.teacher_passes == 20 * 30 + 20
    again = create_synthesizer("deepinv", teacher, FAST, seed=3).synthesize(None, 0)
    assert torch.equal(batch["x"], again["x"])
    other = synth.synthesize(None, 1)
    assert not torch.equal(batch["x"], other["x"])


def test_deepinversion_makes_inputs_the_teacher_assigns_to_their_target(teacher):
    def ce_and_hit(steps):
        synth = create_synthesizer("deepinv", teacher, {**FAST, "steps": steps, "bn_weight": 1}, 0)
        b = synth.synthesize(None, 0)
        ce = torch.nn.functional.cross_entropy(b["target_logits"], b["classes"]).item()
        return ce, (b["target_logits"].argmax(1) == b["classes"]).float().mean().item()

    (ce_short, _), (ce_long, hit) = ce_and_hit(5), ce_and_hit(100)
    assert ce_long < 0.5 * ce_short
    assert hit >= 0.6  # chance is 0.1


def test_adi_uses_the_student(teacher):
    student = new_classifier("digits_cnn_quarter", teacher.spec)
    synth = create_synthesizer("adi", teacher, {**FAST, "steps": 5}, seed=0)
    batch = synth.synthesize(student, 0)
    plain = create_synthesizer("deepinv", teacher, {**FAST, "steps": 5}, seed=0).synthesize(None, 0)
    assert not torch.equal(batch["x"], plain["x"])


def test_bn_methods_refuse_teacher_without_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    t = Classifier(net, InputSpec((1, 8, 8), (0.5,), (0.5,), 10), "mlp")
    with pytest.raises(DfkdError, match="no BatchNorm"):
        create_synthesizer("deepinv", t, {}, 0)
    assert create_synthesizer("deepinv", t, {"bn_weight": "0", **FAST}, 0).synthesize(None, 0)


def test_noise_is_online_and_fresh_each_step(teacher):
    synth = create_synthesizer("noise", teacher, {"batch_size": "8"}, 0)
    a, b = synth.synthesize(None, 0), synth.synthesize(None, 1)
    assert synth.family == "online" and a["x"].shape == (8, 1, 8, 8)
    assert not torch.equal(a["x"], b["x"]) and synth.teacher_passes == 16


def test_transfer_set_parts_round_trip_and_truncate(tmp_path, teacher):
    synth = create_synthesizer("deepinv", teacher, {**FAST, "steps": 2}, 0)
    ts = TransferSet(tmp_path)
    batches = [synth.synthesize(None, i) for i in range(3)]
    for b in batches:
        ts.append(b)
    assert len(ts) == 60
    loaded = TransferSet.open(tmp_path)
    assert torch.equal(loaded.tensors()["x"].float(), torch.cat([b["x"] for b in batches]))
    assert loaded.tensors()["x"].dtype == torch.float16
    assert torch.equal(loaded.tensors()["target_logits"],
                       torch.cat([b["target_logits"] for b in batches]))
    assert len(TransferSet.open(tmp_path, limit=2)) == 40
    assert len(list(tmp_path.glob("part-*"))) == 2
    sample = loaded.sample(16, torch.Generator().manual_seed(0))
    assert sample["x"].shape == (16, 1, 8, 8) and sample["x"].dtype == torch.float32
    with pytest.raises(DfkdError, match="no transfer set"):
        TransferSet.open(tmp_path / "missing")


def test_transfer_set_written_under_the_old_field_names_still_loads(tmp_path):
    """Sets written before `logits` became `target_logits` and `targets` became `classes`."""
    old = {"x": torch.rand(4, 1, 8, 8).half(), "logits": torch.randn(4, 10),
           "targets": torch.arange(4), "seeds": torch.arange(4)}
    save_file(old, str(tmp_path / "part-000000.safetensors"))
    data = TransferSet.open(tmp_path).tensors()
    assert torch.equal(data["target_logits"], old["logits"])
    assert torch.equal(data["classes"], old["targets"])
