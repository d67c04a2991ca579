import json
import math

import pytest
import torch
from torch import nn

from dfkd.cli import main
from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.hooks import stage_outputs
from dfkd.losses import (
    attention_transfer_loss,
    fast_feature_affinity_loss,
    feature_affinity_loss,
    logit_l1_loss,
    nce_loss,
)
from dfkd.models.classifier import Classifier, InputSpec, new_classifier, save_classifier
from dfkd.student.losses import CHOICES, create_student_loss, method_loss

SPEC = InputSpec((1, 8, 8), (0.5,), (0.5,), 10, "digits")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the loss functions on fixed inputs -------------------------------------------------------

def test_logit_l1_golden_values():
    assert logit_l1_loss(torch.tensor([[1.0, 2.0, 3.0]]),
                         torch.tensor([[3.0, 2.0, 1.0]])).item() == pytest.approx(4 / 3)
    assert logit_l1_loss(_randn(4, 10, seed=1), _randn(4, 10, seed=2)).item() == pytest.approx(
        1.075842, abs=1e-5)


def test_attention_transfer_golden_values():
    # teacher attention on the left pixel only, the student's on both: normalized maps (1, 0)
    # and (1, 1)/sqrt(2); mean squared difference = 1 - 1/sqrt(2)
    t = torch.tensor([[[[1.0, 0.0]]]])
    s = torch.tensor([[[[1.0, 1.0]]]])
    assert attention_transfer_loss(s, t).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert attention_transfer_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    ft, fs = _randn(4, 8, 4, 4, seed=3), _randn(4, 3, 4, 4, seed=4)
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(0.0395949, abs=1e-6)
    assert attention_transfer_loss(3 * fs, ft).item() == pytest.approx(0.0395949, abs=1e-6)
    # a student map of another size is resized to the teacher's
    big = _randn(4, 3, 8, 8, seed=5)
    assert attention_transfer_loss(big, ft).item() == pytest.approx(0.0179486, abs=1e-6)


def test_feature_affinity_golden_values_and_the_fast_estimate():
    # teacher samples orthogonal (A_T = I), student samples identical (A_S = all ones)
    t, s = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert feature_affinity_loss(s, t).item() == pytest.approx(0.5)
    ft, fs = _randn(16, 8, 4, 4, seed=6).relu(), _randn(16, 3, 4, 4, seed=7).relu()
    exact = feature_affinity_loss(fs, ft).item()
    assert exact == pytest.approx(0.0157785, abs=1e-6)
    probes = _randn(16, 32, seed=8)
    assert fast_feature_affinity_loss(fs, ft, probes).item() == pytest.approx(0.0146578,
                                                                              abs=1e-6)
    # unbiased: many probes give the exact value
    many = _randn(16, 200_000, seed=9)
    assert fast_feature_affinity_loss(fs, ft, many).item() == pytest.approx(exact, rel=0.02)


def test_nce_loss_golden_value():
    # K = 2 noise samples at probability 0.25 each: K * Pn = 0.5
    probs = torch.tensor([[0.5, 0.1, 0.1]])
    expected = -(math.log(0.5 / 1.0) + 2 * math.log(0.5 / 0.6))
    assert nce_loss(probs, 0.25).item() == pytest.approx(expected, rel=1e-5)
    assert nce_loss(probs, 0.25).item() == pytest.approx(1.057790, abs=1e-5)


# --- the selectable losses on a teacher/student pair ------------------------------------------

@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = new_classifier("digits_cnn", SPEC).eval().requires_grad_(False)
    student = new_classifier("digits_cnn_quarter", SPEC)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return teacher, student, x


def _loss(name, teacher, student, x, options=None, family="transfer_set"):
    torch.manual_seed(2)  # CRD's heads
    crit = create_student_loss(name, options or {}, teacher=teacher, student=student,
                               temperature=4.0, method="deepinv", family=family)
    with torch.no_grad(), crit.capture("teacher"):
        t_logits = teacher(x)
    with crit.capture("student"):
        s_logits = student(x)
    loss = crit(s_logits, t_logits, {"index": torch.arange(len(x))}, set_size=40,
                gen=torch.Generator().manual_seed(3))
    return crit, loss


GOLDEN = {"kd": 0.0657702, "l1": 0.2946213, "at": 4.9235868, "fa": 0.7726045, "crd": 8.8324652}


@pytest.mark.parametrize("name", CHOICES)
def test_each_loss_golden_value_on_a_fixed_pair_and_batch(pair, name):
    crit, loss = _loss(name, *pair)
    assert loss.item() == pytest.approx(GOLDEN[name], rel=1e-4)
    assert crit.report()["student_loss"] == name


@pytest.mark.parametrize("name", CHOICES)
def test_gradients_reach_the_student_and_the_crd_heads(pair, name):
    teacher, student, x = pair
    crit, loss = _loss(name, teacher, student, x)
    loss.backward()
    first = student.net.features[0].weight.grad
    assert first is not None and first.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    if name == "crd":
        assert {n for n, p in crit.named_parameters() if p.grad.abs().sum() > 0} == {
            "embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}


@pytest.mark.parametrize("name", ["at", "fa", "crd"])
def test_the_feature_term_adds_to_kd_and_its_own_gradient(pair, name):
    teacher, student, x = pair
    kd = _loss("kd", teacher, student, x)[1].item()  # this machine's KD (the golden value's own
    # test allows 1e-4 across CPUs); at weight 0 the loss is exactly it
    grads = []
    for weight in (0.0, 1.0):
        student.zero_grad()
        crit, loss = _loss(name, teacher, student, x, {"weight": weight})
        if weight == 0:
            assert loss.item() == pytest.approx(kd, rel=1e-6)
        loss.backward()
        grads.append(student.net.features[0].weight.grad.clone())
        crit.remove()
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("name", CHOICES)
def test_each_loss_decreases_when_the_student_trains_on_it(pair, name):
    teacher, student, x = pair
    torch.manual_seed(2)
    crit = create_student_loss(name, {}, teacher=teacher, student=student, temperature=4.0,
                               method="deepinv", family="transfer_set")
    opt = torch.optim.Adam([*student.parameters(), *crit.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(40):
        with torch.no_grad(), crit.capture("teacher"):
            t_logits = teacher(x)
        with crit.capture("student"):
            s_logits = student(x)
        loss = crit(s_logits, t_logits, {"index": torch.arange(len(x))}, set_size=16, gen=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_fast_feature_affinity_mode_is_reproducible_from_the_generator(pair):
    a = _loss("fa", *pair, {"mode": "fast", "probes": 8})[1].item()
    b = _loss("fa", *pair, {"mode": "fast", "probes": 8})[1].item()
    exact = _loss("fa", *pair)[1].item()
    assert a == b and a != exact
    assert _loss("fa", *pair, {"mode": "fast", "probes": 4000})[1].item() == pytest.approx(
        exact, rel=0.03)


def test_crd_memory_follows_the_set_and_moves_toward_new_embeddings(pair):
    crit, _ = _loss("crd", *pair)
    assert crit.memory_s.bank.shape == (40, 128) and crit.memory_t.bank.shape == (40, 128)
    assert torch.allclose(crit.memory_s.bank.norm(dim=1), torch.ones(40), atol=1e-5)
    assert crit.memory_s.z > 0 and crit.report()["crd_memory"] == 40
    before = crit.memory_s.bank.clone()
    crit.memory_s.update(torch.nn.functional.normalize(torch.ones(2, 128), dim=1),
                         torch.tensor([0, 5]))
    changed = (crit.memory_s.bank != before).any(1)
    assert changed.tolist() == [i in (0, 5) for i in range(40)]
    teacher, student, _ = pair
    fresh = create_student_loss("crd", {}, teacher=teacher, student=student, temperature=4.0,
                                method="deepinv", family="transfer_set")
    assert fresh.memory_s.bank.shape == (0, 128)
    fresh.load_state_dict(crit.state_dict())  # a fresh, empty memory takes the checkpointed one
    assert torch.equal(fresh.memory_s.bank, crit.memory_s.bank)
    assert torch.equal(fresh.embed_s.weight, crit.embed_s.weight) and fresh.memory_t.z > 0


def test_layers_are_found_per_resolution_and_can_be_named(pair):
    teacher, student, x = pair
    assert stage_outputs(teacher) == ["features.5", "features.9"]  # last ReLU at 8x8 and 4x4
    wrn = new_classifier("wrn_16_1", InputSpec((3, 32, 32), (0.5,), (0.5,), 10))
    assert stage_outputs(wrn) == ["blocks.1", "blocks.3", "blocks.5"]  # ZSKT's group outputs
    crit, _ = _loss("at", *pair, {"layers": "features.2:features.5"})
    assert crit.report()["student_loss_layers"] == ["features.2 -> features.5"]
    crit, _ = _loss("crd", *pair)
    assert crit.report()["student_loss_layers"] == ["fc (input) -> fc (input)"]
    with pytest.raises(DfkdError, match="no module 'features.99'"):
        _loss("at", *pair, {"layers": "features.99:features.5"})
    with pytest.raises(DfkdError, match="at compares 4-D feature maps, but student layer "
                       "'features.11' gives shape \\(2, 32\\)"):
        _loss("at", *pair, {"layers": "features.5:features.11"})
    with pytest.raises(DfkdError, match="TEACHER_PATH:STUDENT_PATH pairs"):
        _loss("fa", *pair, {"layers": "features.5"})


def test_models_without_feature_maps_are_a_clear_error(pair):
    _, student, x = pair
    mlp = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), SPEC, "mlp")
    for name in ("at", "fa"):
        with pytest.raises(DfkdError, match=f"'{name}' matches 4-D feature maps.*teacher \\(mlp"
                           ) as e:
            _loss(name, mlp, student, x)
        assert "\n" not in str(e.value)
    no_head = Classifier(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()), SPEC, "convnet")
    with pytest.raises(DfkdError, match="has no nn.Linear; name the layers"):
        _loss("crd", no_head, student, x)


def test_a_method_whose_loss_pairs_feature_maps_falls_back_to_kd_on_a_model_without_them(pair):
    teacher, student, _ = pair
    assert method_loss("at", "zskt", teacher, student) == ("at", "")
    mlp = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), SPEC, "mlp")
    name, why = method_loss("at", "zskt", mlp, student)
    assert name == "kd" and "'zskt' pairs its student loss 'at'" in why and "teacher (mlp)" in why
    assert method_loss("at", "zskt", teacher, mlp)[1].endswith("the student learns by kd alone")
    assert method_loss("l1", "dfad", mlp, mlp) == ("l1", "")


def test_bad_names_options_and_values_are_one_line_errors(pair):
    with pytest.raises(DfkdError, match="unknown student loss 'magic'; choose one of: kd, l1, "
                       "at, fa, crd") as e:
        _loss("magic", *pair)
    assert "\n" not in str(e.value)
    with pytest.raises(DfkdError, match="'at' has no option 'wieght'; options: weight, layers"):
        _loss("at", *pair, {"wieght": "3"})
    with pytest.raises(DfkdError, match="has no option 'weight'; options: \\(none\\)"):
        _loss("kd", *pair, {"weight": "3"})
    with pytest.raises(DfkdError, match="'weight' expects float, got 'heavy'"):
        _loss("at", *pair, {"weight": "heavy"})
    with pytest.raises(DfkdError, match="fa mode must be exact or fast"):
        _loss("fa", *pair, {"mode": "slow"})
    with pytest.raises(DfkdError, match="crd momentum must be in"):
        _loss("crd", *pair, {"momentum": "1"})


def test_crd_with_an_online_method_is_a_clear_error(pair):
    with pytest.raises(DfkdError, match="'crd' needs a fixed transfer set.*method 'deepinv' is "
                       "online") as e:
        _loss("crd", *pair, family="online")
    assert "\n" not in str(e.value)


# --- through the engine and the command line --------------------------------------------------

def _cfg(teacher, out, **kw):
    base = dict(teacher=TeacherArgs(path=str(teacher)), method="noise",
                method_options={"batch_size": 16}, student="digits_cnn_quarter", out=str(out),
                budget="3steps", device="cpu", eval_dataset="digits", eval_points=1,
                batch_size=16, steps_per_round=10)
    base.update(kw)
    return DistillConfig(**base)


def test_loss_flag_reaches_the_engine_and_the_report(digits_teacher, tmp_path, capsys):
    common = ["distill", "--teacher", str(digits_teacher), "--method", "noise", "--set",
              "batch_size=16", "--student", "digits_cnn_quarter", "--budget", "3steps",
              "--eval-points", "1", "--device", "cpu", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "kd")]) == 0
    assert main([*common, "--out", str(tmp_path / "at"), "--loss", "at",
                 "--loss-set", "weight=5"]) == 0
    kd = json.loads((tmp_path / "kd" / "report.json").read_text())
    at = json.loads((tmp_path / "at" / "report.json").read_text())
    assert kd["student_loss"] == "kd" and at["student_loss"] == "at"
    assert at["student_loss_options"] == {"weight": 5.0, "layers": ""}
    assert at["student_loss_layers"] == ["features.5 -> features.5", "features.9 -> features.9"]
    # at needs the teacher's features: one more teacher pass over each student batch
    assert kd["teacher_passes"] == 3 * 16 and at["teacher_passes"] == 2 * 3 * 16
    saved = (tmp_path / "at" / "config.yaml").read_text()
    assert "\nloss: at\n" in saved and "loss_options:\n  weight: '5'" in saved
    assert main([*common, "--out", str(tmp_path / "bad"), "--loss", "magic"]) == 2
    assert "unknown student loss 'magic'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_crd_trains_on_a_transfer_set_and_refuses_online_methods(digits_teacher, tmp_path):
    report = distill(_cfg(digits_teacher, tmp_path / "crd", method="deepinv", loss="crd",
                          method_options={"batch_size": 16, "steps": 2}, budget="12steps",
                          augment="none"), progress=False)
    assert report["student_loss"] == "crd" and report["crd_memory"] == report["samples"] == 32
    # no augmentation: the teacher pass for the features is the only one per student step
    assert report["teacher_passes"] == 2 * 16 * 3 + 12 * 16
    with pytest.raises(DfkdError, match="'crd' needs a fixed transfer set.*'noise' is online"):
        distill(_cfg(digits_teacher, tmp_path / "online", loss="crd"), progress=False)
    assert not (tmp_path / "online").exists()


def test_zskt_runs_on_an_mlp_teacher_with_kd_and_says_so(tmp_path):
    torch.manual_seed(0)
    save_classifier(new_classifier("mlp_32", SPEC), tmp_path / "mlp.safetensors")
    teacher = tmp_path / "mlp.safetensors"
    report = distill(_cfg(teacher, tmp_path / "zskt", method="zskt", student="mlp_16",
                          method_options={"batch_size": 16}), progress=False)
    assert report["student_loss"] == "kd" and report["steps"] == 3
    assert "teacher (mlp_32) has none" in report["student_loss_fallback"]
    with pytest.raises(DfkdError, match="'at' matches 4-D feature maps"):  # asked for: no swap
        distill(_cfg(teacher, tmp_path / "at", method="zskt", student="mlp_16", loss="at"),
                progress=False)


def test_scratch_real_keeps_its_cross_entropy(digits_teacher, tmp_path):
    opts = {"batch_size": 16}
    report = distill(_cfg(digits_teacher, tmp_path / "ce", method="scratch_real",
                          method_options=opts), progress=False)
    assert report["student_loss"] == "ce" and report["teacher_passes"] == 0
    with pytest.raises(DfkdError, match="true labels and no teacher logits, so student loss 'at'"):
        distill(_cfg(digits_teacher, tmp_path / "at", method="scratch_real", loss="at",
                     method_options=opts), progress=False)
