"""CMI: its loss pieces on fixed inputs, the memory bank, the views and one synthesis round."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError
from dfkd.models.classifier import Classifier, InputSpec, load_classifier, new_classifier
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.cmi import MemoryBank, info_nce, instance_means, masked_adversarial

TINY = {"batch_size": 20, "steps": 6, "nz": 16, "ngf": 8, "negatives": 32}


@pytest.fixture
def teacher(digits_teacher):
    return load_classifier(digits_teacher).eval().requires_grad_(False)


def _unit_rows(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, 4, generator=g), dim=1),
            F.normalize(torch.randn(n, 4, generator=g), dim=1))


def test_info_nce_golden_values_and_split_mean():
    q, k = _unit_rows(6)
    # rows 0-3 are the current batch, 4-5 come from the bank: mean of each part, added
    assert info_nce(q, k, 0.1, 4).item() == pytest.approx(13.686557, abs=1e-4)
    assert info_nce(q, k, 0.1, 6).item() == pytest.approx(5.694314, abs=1e-4)
    assert info_nce(q, k, 0.2, 4).item() == pytest.approx(7.434147, abs=1e-4)
    # each query its own key, orthogonal to the others: close to zero
    eye = torch.eye(4)
    assert info_nce(eye, eye, 0.1, 4).item() < 1e-3
    # keys are targets: the gradient reaches the queries only
    q.requires_grad_(True)
    k.requires_grad_(True)
    info_nce(q, k, 0.1, 4).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None


def test_masked_adversarial_golden_value_and_mask():
    s = torch.tensor([[2.0, 0, -1], [0, 1, 0], [1, 0, 3], [0.5, 0, 0]])
    t = torch.tensor([[1.0, 0, 0], [0, 3, 1], [0, 2, 0], [0, 0, 1]])
    # rows 0 and 1 agree (argmax 0, 1); -(KL_0 + KL_1) / 4
    assert masked_adversarial(s, t).item() == pytest.approx(-0.1094023, abs=1e-6)
    s.requires_grad_(True)
    masked_adversarial(s, t).backward()
    assert s.grad[:2].abs().sum() > 0 and s.grad[2:].abs().sum() == 0
    # no sample agrees: exactly zero, and no gradient at all
    disagree = torch.tensor([[0.0, 2, 0], [0, 0, 2], [2, 0, 0], [0, 2, 0]], requires_grad=True)
    value = masked_adversarial(disagree, t)
    value.backward()
    assert value.item() == 0.0 and disagree.grad.abs().sum() == 0
    # identical distributions agree but diverge by nothing
    assert masked_adversarial(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_memory_bank_is_a_capped_fifo_ring():
    bank = MemoryBank(5, 2, torch.device("cpu"))
    rows = torch.arange(40.0).view(20, 2)
    bank.add(rows[:3])
    assert len(bank) == 3
    bank.add(rows[3:7])  # 7 rows seen, cap 5: rows 0 and 1 overwritten (oldest first)
    assert len(bank) == 5
    assert sorted(bank.data[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    for start in range(7, 20, 3):
        bank.add(rows[start:start + 3])
        assert len(bank) == 5
    assert sorted(bank.data[:, 0].tolist()) == [30.0, 32.0, 34.0, 36.0, 38.0]
    bank.add(rows)  # more rows than the cap at once: the newest five
    assert sorted(bank.data[:, 0].tolist()) == [30.0, 32.0, 34.0, 36.0, 38.0]
    drawn = bank.sample(3, torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 2) and len(set(drawn[:, 0].tolist())) == 3
    assert bank.sample(99, torch.Generator()).shape == (5, 2)
    copy = MemoryBank(5, 2, torch.device("cpu"))
    copy.load_state_dict(bank.state_dict())
    bank.add(rows[:2])
    copy.add(rows[:2])
    assert torch.equal(bank.data, copy.data)
    with pytest.raises(DfkdError, match="resume with the same options"):
        MemoryBank(3, 2, torch.device("cpu")).load_state_dict(bank.state_dict())
    empty = MemoryBank(0, 2, torch.device("cpu"))
    empty.add(rows)
    assert len(empty) == 0 and empty.sample(4, torch.Generator()).shape == (0, 2)


def test_instance_means_of_maps_and_vectors():
    assert instance_means(torch.ones(2, 3, 4, 4)).shape == (2, 3)
    assert instance_means(torch.ones(2, 5)).shape == (2, 5)


def test_cmi_batch_is_valid_reproducible_and_fills_the_bank(teacher):
    synth = create_synthesizer("cmi", teacher, TINY, seed=1)
    assert synth.feature_dim == 32 + 64 + 128 + 128  # inputs of the teacher's four BatchNorms
    head_before = [p.clone() for p in synth.head.parameters()]
    batch = synth.synthesize(None, 0)
    assert batch["x"].shape == (20, 1, 8, 8)
    assert batch["x"].min() >= 0 and batch["x"].max() <= 1
    assert torch.equal(batch["x"], batch["x"].half().float())
    assert torch.allclose(batch["target_logits"], teacher(batch["x"]), atol=1e-5)
    assert sorted(batch["classes"].tolist()) == sorted(list(range(10)) * 2)
    assert synth.teacher_passes == 20 * 6 * 2 + 20  # global and local view per step, label
    assert len(synth.bank) == 20 and synth.report()["bank_entries"] == 20
    assert any(not torch.equal(a, b) for a, b in zip(head_before, synth.head.parameters(),
                                                  strict=True))
    again = create_synthesizer("cmi", teacher, TINY, seed=1).synthesize(None, 0)
    assert torch.equal(batch["x"], again["x"])
    assert not torch.equal(batch["x"], synth.synthesize(None, 1)["x"])
    assert len(synth.bank) == 40


def test_synthesis_never_touches_the_global_rng(teacher):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_synthesizer("cmi", teacher, TINY, seed=0).synthesize(None, 0)
    assert torch.equal(torch.rand(3), expected)


def test_the_lowest_loss_batch_is_kept(teacher):
    synth = create_synthesizer("cmi", teacher, TINY, seed=0)
    seen = []
    original = synth.loss

    def scripted(x, *args):  # step 2 gets a constant bonus: same gradient, lowest value
        loss, features = original(x, *args)
        bonus = -100.0 if len(seen) == 2 else 0.0
        seen.append((x.detach().clone(), features.clone(), loss.item() + bonus))
        return loss + bonus, features

    synth.loss = scripted
    batch = synth.synthesize(None, 0)
    assert len(seen) == 6
    best_x, best_features, _ = seen[2]
    assert not torch.equal(best_x, seen[-1][0])
    assert torch.equal(batch["x"], synth.stored_pixels(best_x))
    assert torch.equal(synth.bank.data, best_features)


def test_loss_decreases_within_a_round(teacher):
    synth = create_synthesizer("cmi", teacher, {**TINY, "steps": 20, "lr": 0.003}, seed=0)
    values = []
    original = synth.loss

    def recording(*args):
        loss, features = original(*args)
        values.append(loss.item())
        return loss, features

    synth.loss = recording
    synth.synthesize(None, 0)
    assert min(values[-5:]) < 0.8 * values[0]


def test_student_is_the_adversary_and_is_left_as_found(teacher):
    student = new_classifier("digits_cnn_quarter", teacher.spec).train()
    with_student = create_synthesizer("cmi", teacher, TINY, seed=0).synthesize(student, 0)
    alone = create_synthesizer("cmi", teacher, TINY, seed=0).synthesize(None, 0)
    assert not torch.equal(with_student["x"], alone["x"])
    assert student.training and all(p.requires_grad and p.grad is None
                                     for p in student.parameters())


def test_state_round_trip_continues_identically(teacher, tmp_path):
    a = create_synthesizer("cmi", teacher, TINY, seed=0)
    a.synthesize(None, 0)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = create_synthesizer("cmi", teacher, TINY, seed=0)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert b.teacher_passes == a.teacher_passes and len(b.bank) == 20
    assert torch.equal(a.synthesize(None, 1)["x"], b.synthesize(None, 1)["x"])
    assert torch.equal(a.bank.data, b.bank.data)


def test_bad_options_and_teachers_are_clear_errors(teacher):
    with pytest.raises(DfkdError, match="0 < local_scale <= 1"):
        create_synthesizer("cmi", teacher, {"local_scale": "0"}, 0)
    with pytest.raises(DfkdError, match="batch_size >= 2"):
        create_synthesizer("cmi", teacher, {"batch_size": "1"}, 0)
    with pytest.raises(DfkdError, match="flip must be true, false or auto"):
        create_synthesizer("cmi", teacher, {"flip": "maybe"}, 0)
    odd = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(36, 10)),
                     InputSpec((1, 6, 6), (0.5,), (0.5,), 10), "mlp")
    with pytest.raises(DfkdError, match="side divisible by 4; the teacher expects 6x6"):
        create_synthesizer("cmi", odd, {}, 0)
    plain = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                       InputSpec((1, 8, 8), (0.5,), (0.5,), 10), "mlp")
    with pytest.raises(DfkdError, match="teacher has none; set bn_weight=0 and cr_weight=0"):
        create_synthesizer("cmi", plain, {}, 0)
    synth = create_synthesizer("cmi", plain, {**TINY, "bn_weight": 0, "cr_weight": 0}, 0)
    batch = synth.synthesize(None, 0)
    assert batch["x"].shape == (20, 1, 8, 8) and synth.teacher_passes == 20 * 6 + 20
