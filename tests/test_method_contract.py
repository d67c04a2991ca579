"""The contract of every registered method, present and future: what a batch holds and in what
range, that a transfer set stores it exactly, that stored logits are the teacher's on exactly
the stored inputs, that a seed reproduces the rounds, and that a method's state carries a run
across a restart. (Kill-and-resume through `dfkd distill` runs over the same registry in
test_distill.py.)"""

import copy

import pytest
import torch

from dfkd.models.classifier import load_classifier, new_classifier
from dfkd.synthesis import create_synthesizer, list_methods, method_class
from dfkd.synthesis.transfer_set import TransferSet
from method_sizes import small_options

REGISTRY = sorted(list_methods(anchors=True))


@pytest.fixture
def teacher(digits_teacher):
    """A fresh teacher per test: methods hook into it."""
    return load_classifier(digits_teacher).eval().requires_grad_(False)


@pytest.fixture
def student(teacher):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return new_classifier("digits_cnn_quarter", teacher.spec)


def _synth(name, teacher, seed=0):
    return create_synthesizer(name, teacher, small_options(name), seed=seed)


def _rounds(synth, student, n):
    student = copy.deepcopy(student)  # an adversarial round may move its BatchNorm statistics
    return [synth.synthesize(student, i) for i in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", REGISTRY)
def test_a_batch_has_the_contract_schema_and_ranges(name, teacher, student):
    batch = _synth(name, teacher).synthesize(student, 0)
    x, n = batch["x"], len(batch["x"])
    assert x.dtype == torch.float32 and x.shape == (n, *teacher.spec.shape) and n > 0
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1  # pixels
    assert batch["classes"].dtype == torch.long and batch["classes"].shape == (n,)
    assert batch["classes"].min() >= -1 and batch["classes"].max() < teacher.spec.num_classes
    assert batch["seeds"].dtype == torch.long and batch["seeds"].shape == (n,)
    # soft targets, or true labels (anchor)
    assert ("target_logits" in batch) != ("labels" in batch)
    if "target_logits" in batch:
        assert batch["target_logits"].shape == (n, teacher.spec.num_classes)
        if method_class(name).targets_are_teacher_logits:
            with torch.no_grad():
                assert torch.allclose(batch["target_logits"], teacher(x).float(), atol=1e-5)
        else:  # soft targets made otherwise: they still name the class the teacher decides
            with torch.no_grad():
                assert torch.equal(batch["target_logits"].argmax(1), teacher(x).argmax(1))
    else:
        assert method_class(name).uses_real_data


@pytest.mark.parametrize("name", [n for n in REGISTRY
                                  if method_class(n).family == "transfer_set"])
def test_a_transfer_set_stores_a_round_exactly(name, teacher, student, tmp_path):
    batch = _synth(name, teacher).synthesize(student, 0)
    assert torch.equal(batch["x"], batch["x"].half().float())  # float16 storage loses nothing
    TransferSet(tmp_path).append(batch)
    stored = TransferSet.open(tmp_path).tensors()
    assert torch.equal(stored["x"].float(), batch["x"])
    assert torch.equal(stored["target_logits"], batch["target_logits"])
    if method_class(name).targets_are_teacher_logits:
        with torch.no_grad():  # the stored logits are the teacher's on the stored pixels
            assert torch.allclose(teacher(stored["x"].float()).float(),
                                  stored["target_logits"], atol=1e-5)


@pytest.mark.parametrize("name", REGISTRY)
def test_a_seed_reproduces_the_rounds_and_another_seed_does_not(name, teacher, student):
    first = _rounds(_synth(name, teacher), student, 2)
    again = _rounds(_synth(name, teacher), student, 2)
    for a, b in zip(first, again, strict=True):
        _same(a, b)
    other = _synth(name, teacher, seed=1).synthesize(student, 0)
    assert not torch.equal(other["x"], first[0]["x"])


@pytest.mark.parametrize("name", REGISTRY)
def test_state_dict_carries_the_method_across_a_restart(name, teacher, student):
    running = _synth(name, teacher)
    running.synthesize(student, 0)
    restarted = _synth(name, teacher)
    restarted.load_state_dict(copy.deepcopy(running.state_dict()))
    assert restarted.teacher_passes == running.teacher_passes
    resumed_student = copy.deepcopy(student)
    _same(restarted.synthesize(resumed_student, 1), running.synthesize(student, 1))
