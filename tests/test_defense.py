"""The ABD backdoor defence: shuffled teachers, the vaccine's loss, self-retrospection, and how
a run takes it (a random start, kd or l1 only)."""

import pytest
import torch
from torch import nn

from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.models.classifier import Classifier, InputSpec, load_classifier
from dfkd.student.defense import ABD, ABDOptions, create_defense, shuffled_copy
from dfkd.student.defense_base import Defense
from dfkd.student.losses import create_student_loss

SPEC = InputSpec((1, 8, 8), (0.5,), (0.5,), 4)


def _conv_net():
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3),
                                    nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)),
                      SPEC, "tiny")


def test_shuffled_copy_permutes_the_input_channels_of_the_last_convolutions_only():
    teacher = _conv_net()
    calls = []
    teacher.net[4].register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    copy = shuffled_copy(teacher, 2, torch.Generator().manual_seed(0))
    after = copy.net.state_dict()
    assert all(torch.equal(before[k], v) for k, v in teacher.net.state_dict().items())
    assert torch.equal(after["0.weight"], before["0.weight"])  # first conv kept
    for name in ("2.weight", "4.weight"):  # every input channel still there, in a new order
        w, b = after[name], before[name]
        assert not torch.equal(w, b)
        assert sorted(w.sum((0, 2, 3)).tolist()) == pytest.approx(sorted(b.sum((0, 2, 3)).tolist()))
    assert torch.equal(after["8.weight"], before["8.weight"])  # the head is never shuffled
    copy(torch.rand(2, 1, 8, 8))
    assert not calls  # the teacher's hooks (a method's BatchNorm prior) stay on the teacher


def test_without_convolutions_the_linear_layers_before_the_head_are_shuffled():
    torch.manual_seed(0)
    mlp = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8),
                                   nn.ReLU(), nn.Linear(8, 4)), SPEC, "mlp")
    copy = shuffled_copy(mlp, 5, torch.Generator().manual_seed(0))
    assert not torch.equal(copy.net[3].weight, mlp.net[3].weight)
    assert torch.equal(copy.net[5].weight, mlp.net[5].weight)
    with pytest.raises(DfkdError, match="has none"):
        shuffled_copy(Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), SPEC, "lin"), 5,
                      torch.Generator())


def _abd(teacher, **opts):
    return ABD(ABDOptions(**{"copies": 2, "layers": 2, **opts}), teacher, seed=0)


def test_the_vaccine_learns_the_clean_samples_and_moves_away_on_the_suspects(monkeypatch):
    teacher, student = _conv_net(), _conv_net()
    torch.manual_seed(1)
    for p in student.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    crit = create_student_loss("kd", {}, teacher=teacher, student=student, temperature=4.0,
                               method="deepinv", family="transfer_set")
    abd = _abd(teacher, sv_weight=0.3)
    x = torch.rand(6, 1, 8, 8)
    t = teacher(x).detach()
    mask = torch.tensor([True, False, False, True, False, False])
    monkeypatch.setattr(abd, "suspect", lambda x_, t_: mask)
    s = student(x)
    expected = crit(s[~mask], t[~mask], {}) - 0.3 * crit(s[mask], t[mask], {})
    torch.testing.assert_close(abd.student_loss(crit, student, x, t, {}), expected)


def test_the_vaccine_ascent_stops_at_the_distance_of_a_uniform_answer(monkeypatch):
    teacher, student = _conv_net(), _conv_net()
    crit = create_student_loss("kd", {}, teacher=teacher, student=student, temperature=1.0,
                               method="deepinv", family="transfer_set")
    x = torch.rand(4, 1, 8, 8)
    t = teacher(x).detach() * 20  # a confident teacher
    with torch.no_grad():  # a student that answers against the teacher: beyond the bound
        student.net[-1].weight.copy_(teacher.net[-1].weight * -20)
        student.net[-1].bias.copy_(teacher.net[-1].bias * -20)
    mask = torch.tensor([True, True, False, False])
    s = student(x)
    far = crit(torch.zeros_like(s[mask]), t[mask], {})
    assert crit(s[mask], t[mask], {}) > far
    bounded, unbounded = _abd(teacher), _abd(teacher, sv_bounded=False)
    for abd in (bounded, unbounded):
        monkeypatch.setattr(abd, "suspect", lambda x_, t_: mask)
    loss = bounded.student_loss(crit, student, x, t, {})
    torch.testing.assert_close(loss, crit(s[~mask], t[~mask], {}) - 0.1 * far)
    torch.testing.assert_close(unbounded.student_loss(crit, student, x, t, {}),
                               crit(s[~mask], t[~mask], {}) - 0.1 * crit(s[mask], t[mask], {}))
    # past the bound the suspects add no gradient: only the clean rows move the student
    grads = torch.autograd.grad(loss, student.net[-1].bias)[0]
    clean = torch.autograd.grad(crit(student(x)[~mask], t[~mask], {}), student.net[-1].bias)[0]
    torch.testing.assert_close(grads, clean)


def test_retrospection_steps_at_its_own_small_learning_rate_annealed_to_zero():
    abd = _abd(_conv_net(), sr_share=0.2, sr_lr=1e-3)
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.05)
    abd.set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 0.05  # before retrospection: the run's own schedule
    abd.set_lr(opt, 0.8)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    abd.set_lr(opt, 0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    abd.set_lr(opt, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    opt.param_groups[0]["lr"] = 1e-4  # never above the run's own rate
    abd.set_lr(opt, 0.8)
    assert opt.param_groups[0]["lr"] == 1e-4


def test_a_stored_sets_samples_are_judged_once_as_stored():
    teacher = _conv_net()
    abd = _abd(teacher)
    stored = torch.rand(6, 1, 8, 8)
    judged = []
    original = abd.suspect
    abd.suspect = lambda x, t: judged.append(len(x)) or original(x, t)
    first = abd.stored_suspects({"x": stored[[0, 1, 2]], "index": torch.tensor([0, 1, 2])})
    second = abd.stored_suspects({"x": stored[[2, 5, 1]], "index": torch.tensor([2, 5, 1])})
    assert judged == [3, 1]  # sample 5 only: 1 and 2 kept their flags
    truth = original(stored, teacher(stored))
    assert torch.equal(first, truth[[0, 1, 2]]) and torch.equal(second, truth[[2, 5, 1]])
    restored = _abd(teacher)
    restored.load_state_dict(abd.state_dict())
    restored.suspect = lambda x, t: judged.append(len(x)) or original(x, t)
    assert torch.equal(restored.stored_suspects({"x": stored[[5]], "index": torch.tensor([5])}),
                       truth[[5]]) and judged == [3, 1]


def test_suspects_are_the_samples_the_shuffled_teachers_still_agree_on():
    teacher = _conv_net()
    abd = _abd(teacher)
    x = torch.rand(32, 1, 8, 8)
    t = teacher(x).detach()
    found = abd.suspect(x, t)
    mean = torch.stack([m(x) for m in abd.shuffled]).mean(0)
    assert torch.equal(found, mean.argmax(1) == t.argmax(1))
    assert abd.report()["suspect_share"] == pytest.approx(found.float().mean().item(), abs=1e-4)


def test_self_retrospection_finds_a_trigger_surrogate_and_adds_its_hypergradient():
    teacher, student = _conv_net(), _conv_net()
    abd = _abd(teacher, sr_steps=5, sr_rows=0.5)
    x = torch.rand(8, 1, 8, 8)
    delta = abd.trigger_surrogate(teacher, x)  # in the teacher's normalized units (std 0.5)
    assert delta.shape == (1, 1, 8, 8) and delta.abs().sum() > 0
    assert delta.abs().max() > 0.5 * 5 * 0.1  # Adam's steps of 0.1, mostly in one direction
    moved = (teacher(x + 0.5 * delta).softmax(1) - teacher(x).softmax(1)).abs().sum()
    assert moved > 0
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    abd.retrospect(student, teacher, x, torch.Generator().manual_seed(0))
    first = [p.grad.clone() for p in student.parameters()]
    assert any(g.abs().sum() > 0 for g in first)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    abd.retrospect(student, teacher, x, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p.grad) for a, p in zip(first, student.parameters(), strict=True))
    assert abd.report()["retrospection_steps"] == 2
    assert abd.retrospecting(0.95) and not abd.retrospecting(0.5)


def test_a_defended_run_starts_random_and_reports_the_defence(digits_teacher, tmp_path):
    base = dict(teacher=TeacherArgs(path=str(digits_teacher)), method="deepinv",
                method_options={"batch_size": 16, "steps": 2}, student="digits_cnn_quarter",
                budget="8steps", batch_size=16, steps_per_round=4, device="cpu",
                eval_points=2)
    report = distill(DistillConfig(**base, out=str(tmp_path / "a"), defense="abd",
                                   defense_options={"copies": 1, "sr_share": 0.5,
                                                    "sr_steps": 1}), progress=False)
    assert report["student_init"] == "random" and report["defense"] == "abd"
    assert report["retrospection_steps"] == 4 and 0 <= report["suspect_share"] <= 1
    plain = distill(DistillConfig(**base, out=str(tmp_path / "b")), progress=False)
    assert plain["student_init"] == "teacher" and "defense" not in plain
    for extra, message in [({"student_init": "teacher"}, "drop --student-init teacher"),
                           ({"loss": "at"}, "kd and l1"),
                           ({"defense_options": {"copies": 0}}, "must be >= 1"),
                           ({"defense_options": {"shuffle": 1}}, "has no option 'shuffle'")]:
        with pytest.raises(DfkdError, match=message):
            distill(DistillConfig(**{**base, "defense": "abd", **extra},
                                  out=str(tmp_path / "c")), progress=False)
    with pytest.raises(DfkdError, match="--update plain"):
        create_defense("abd", {}, load_classifier(digits_teacher), "kd", object(), 0)
    with pytest.raises(DfkdError, match="unknown defense 'strip'; choose one of: none, abd, nc"):
        create_defense("strip", {}, load_classifier(digits_teacher), "kd", None, 0)


def test_both_defences_are_defenses_and_the_hooks_they_skip_do_nothing():
    teacher = _conv_net()
    abd = create_defense("abd", {}, teacher, "kd", None, 0)
    nc = create_defense("nc", {}, teacher, "kd", None, 0)
    assert isinstance(abd, Defense) and isinstance(nc, Defense)
    assert create_defense("none", {}, teacher, "kd", None, 0) is None
    x = torch.rand(4, 1, 8, 8)
    assert abd.inputs(x, 0.5, torch.Generator()) is x
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    nc.set_lr(opt, 0.99)
    assert opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(NotImplementedError, match="'nc' does not weigh"):
        nc.student_loss(None, teacher, x, teacher(x), {})
