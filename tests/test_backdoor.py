"""Backdoor triggers, poisoned teachers and the attack success rate (evaluation only)."""

import json

import pytest
import torch

from dfkd.backdoor import Trigger, attack_success_rate, poisoned_indices
from dfkd.cli import main
from dfkd.commands.train_teacher import TeacherConfig, train_teacher
from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError


def test_trigger_specs_parse_round_trip_and_fail_in_one_line():
    t = Trigger.parse("badnets:target=3,size=2")
    assert (t.kind, t.target, t.size, t.margin) == ("badnets", 3, 2, 1)
    assert Trigger.parse(t.spec()) == t and t.spec() == "badnets:target=3,size=2,margin=1"
    b = Trigger.parse("blend")
    assert (b.kind, b.target, b.alpha) == ("blend", 0, 0.2)
    assert Trigger.parse(b.spec()) == b
    for bad, message in [("wanet", "unknown trigger"), ("badnets:size", "key=value"),
                         ("badnets:colour=1", "has no option 'colour'"),
                         ("blend:alpha=0", "alpha in"), ("badnets:size=x", "expects int")]:
        with pytest.raises(DfkdError, match=message):
            Trigger.parse(bad)
    with pytest.raises(DfkdError, match="does not fit"):
        Trigger.parse("badnets:size=8").check(10, (1, 8, 8))
    with pytest.raises(DfkdError, match="not a class"):
        Trigger.parse("badnets:target=10").check(10, (1, 8, 8))


def test_badnets_pastes_a_checkerboard_in_the_corner_and_nothing_else():
    x = torch.full((2, 3, 8, 8), 0.5)
    stamped = Trigger.parse("badnets:size=3,margin=1").stamp(x)
    patch = stamped[:, :, 4:7, 4:7]
    assert torch.equal(patch[0, 0], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    assert torch.equal(patch[1], patch[0])  # the same patch on every image and channel
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[4:7, 4:7] = False
    assert (stamped[:, :, outside] == 0.5).all()


def test_blend_mixes_a_fixed_pattern_at_its_opacity():
    x = torch.rand(4, 1, 8, 8)
    trigger = Trigger.parse("blend:alpha=0.25,seed=7")
    _, pattern = trigger.pattern((1, 8, 8))
    torch.testing.assert_close(trigger.stamp(x), 0.75 * x + 0.25 * pattern)
    assert torch.equal(trigger.stamp(x), trigger.stamp(x))
    assert not torch.equal(Trigger.parse("blend:seed=8").pattern((1, 8, 8))[1], pattern)


def test_poisoned_indices_take_the_share_from_other_classes_reproducibly():
    labels = torch.arange(100) % 10
    trigger = Trigger.parse("badnets:target=2")
    idx = poisoned_indices(labels, trigger, 0.1, torch.Generator().manual_seed(0))
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert (labels[idx] != 2).all()
    assert torch.equal(idx, poisoned_indices(labels, trigger, 0.1,
                                             torch.Generator().manual_seed(0)))
    with pytest.raises(DfkdError, match="poison rate"):
        poisoned_indices(labels, trigger, 1.5, torch.Generator())


def test_attack_success_rate_on_a_hand_built_model():
    """A 'model' that obeys the patch only on dark images: ASR is the share of dark images
    among those not of the target class."""
    x = torch.cat([torch.full((6, 1, 8, 8), 0.2), torch.full((4, 1, 8, 8), 0.8)])
    y = torch.tensor([0, 1, 1, 2, 2, 3, 1, 2, 3, 0])  # target 0: images 0 and 9 do not count
    trigger = Trigger.parse("badnets:target=0")

    def logits_of(batch):
        dark = batch[:, 0, 0, 0] < 0.5
        fires = (batch[:, 0, 4, 4] == 1.0) & dark
        return torch.nn.functional.one_hot(torch.where(fires, 0, 3), 4).float()

    assert attack_success_rate(logits_of, x, y, trigger) == pytest.approx(5 / 8)
    with pytest.raises(DfkdError, match="other classes"):
        attack_success_rate(logits_of, x[:1], y[:1], trigger)


def _teacher(tmp_path, name, **kw):
    cfg = TeacherConfig(**{"dataset": "digits", "model": "digits_cnn", "out": str(tmp_path / name),
                           "epochs": 3, "device": "cpu", **kw})
    return train_teacher(cfg, progress=False)


def test_poisoned_teacher_learns_the_trigger_and_reports_it(tmp_path):
    clean = _teacher(tmp_path, "clean")
    poisoned = _teacher(tmp_path, "poisoned", poison="badnets:target=0,size=3", poison_rate=0.1)
    assert "asr" not in clean
    assert poisoned["trigger"] == "badnets:target=0,size=3,margin=1"
    assert poisoned["poisoned_images"] == round(0.1 * 1347)  # digits' training split
    assert poisoned["test_acc"] > 0.85
    from dfkd.evaluate import load_eval_data, predict_logits
    from dfkd.models.classifier import load_classifier

    model = load_classifier(tmp_path / "clean")
    data = load_eval_data("digits", model)
    clean_asr = attack_success_rate(lambda x: predict_logits(model, x), data.x, data.y,
                                    Trigger.parse("badnets:target=0"))
    assert poisoned["asr"] > clean_asr + 0.4  # three epochs plant it; clean models ignore it


def test_init_fine_tunes_the_given_weights(tmp_path, digits_teacher):
    """At a vanishing learning rate, fine-tuning leaves the weights where they were: the run
    starts from --init."""
    from dfkd.models.classifier import InputSpec, load_classifier, new_classifier, save_classifier

    before = load_classifier(digits_teacher)
    report = _teacher(tmp_path, "ft", init=str(digits_teacher), lr=1e-12, epochs=1,
                      poison="blend:alpha=0.2")
    after = load_classifier(tmp_path / "ft")
    # weights only: BatchNorm's running statistics move with any training forward pass
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(
        before.net.parameters(), after.net.parameters(), strict=True))
    assert after.spec == before.spec and "asr" in report
    four = new_classifier("digits_cnn", InputSpec((1, 8, 8), (0.5,), (0.5,), 4))
    save_classifier(four, tmp_path / "four.safetensors")
    with pytest.raises(DfkdError, match="--init has 4 classes, digits has 10"):
        _teacher(tmp_path, "bad", init=str(tmp_path / "four.safetensors"))


def test_distill_reports_teacher_and_student_asr_without_training_on_it(tmp_path,
                                                                       digits_teacher, capsys):
    cfg = DistillConfig(teacher=TeacherArgs(path=str(digits_teacher)), method="noise",
                        student="digits_cnn_quarter", budget="6steps", batch_size=16,
                        eval_points=2, out=str(tmp_path / "s"), device="cpu",
                        eval_trigger="badnets:target=1")
    report = distill(cfg, progress=False)
    assert report["trigger"] == "badnets:target=1,size=3,margin=1"
    assert 0 <= report["teacher_asr"] <= 1 and 0 <= report["student_asr"] <= 1
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text()
               .splitlines()]
    assert records[-1]["student_asr"] == report["student_asr"]
    plain = distill(DistillConfig(**{**vars(cfg), "eval_trigger": "",
                                     "out": str(tmp_path / "p")}), progress=False)
    assert plain["student_acc"] == report["student_acc"]  # the trigger changes no training
    with pytest.raises(DfkdError, match="target 12 is not a class"):  # before any work
        distill(DistillConfig(**{**vars(cfg), "eval_trigger": "badnets:target=12",
                                 "out": str(tmp_path / "bad")}), progress=False)
    assert not (tmp_path / "bad").exists()
    assert main(["evaluate", "--model", str(digits_teacher), "--trigger", "badnets:target=1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["asr"] == pytest.approx(report["teacher_asr"])
    assert main(["evaluate", "--model", str(digits_teacher), "--trigger", "nets"]) == 2
    assert "unknown trigger 'nets'" in capsys.readouterr().err
