"""The core method (mvn), ZSKD and the feature-space machinery they stand on."""

import pytest
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import head_path
from dfkd.losses import soft_target_loss
from dfkd.models.classifier import Classifier, InputSpec, load_classifier, new_classifier
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.base import balanced_targets
from dfkd.synthesis.feature_space import FeatureSpace
from dfkd.synthesis.mvn import repair_psd, shrunk_covariance
from dfkd.synthesis.zskd import class_similarity, sample_dirichlet

TINY = {"batch_size": 20, "steps": 5, "center_steps": 10, "bootstrap_size": 64}
PAPER = {"bn_weight": 0, "tv_weight": 0, "view": "none"}  # the paper's synthesis loss alone


def _random(arch: str, shape=(1, 32, 32)) -> Classifier:
    torch.manual_seed(0)
    return new_classifier(arch, InputSpec(shape, (0.5,), (0.25,), 10, "mnist")).eval() \
        .requires_grad_(False)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(self.body(x))


def _mlp() -> Classifier:
    torch.manual_seed(0)
    net = MLP()
    with torch.no_grad():  # non-trivial BN statistics
        net.train()
        net(torch.randn(256, 1, 8, 8))
    return Classifier(net, InputSpec((1, 8, 8), (0.5,), (0.25,), 10, "digits"), "mlp").eval() \
        .requires_grad_(False)


@pytest.mark.parametrize("make,dim", [(lambda: _random("lenet5"), 84),
                                      (lambda: _random("resnet8", (3, 32, 32)), 64),
                                      (_mlp, 32)])
def test_default_space_is_the_head_input_and_rest_is_the_head(make, dim):
    teacher = make()
    space = FeatureSpace(teacher.net, teacher.spec.shape)
    assert space.dim == dim and space.capture == "input"
    head = dict(teacher.net.named_modules())[head_path(teacher.net, "")]
    h = torch.rand(5, dim)
    torch.testing.assert_close(space.rest(h), head(h))
    x = torch.randn(3, *teacher.spec.shape)
    logits = teacher.net(x)
    torch.testing.assert_close(head(space.features()), logits)
    space.remove()


def test_named_layer_and_logit_space():
    teacher = _random("lenet5")
    logit = FeatureSpace(teacher.net, teacher.spec.shape, "fc")
    h = torch.randn(4, 10)
    torch.testing.assert_close(logit.rest(h), h)
    assert logit.weight_correlation().shape == (10, 10)
    logit.remove()
    mid = FeatureSpace(teacher.net, teacher.spec.shape, "features.14")
    x = torch.randn(2, 1, 32, 32)
    logits = teacher.net(x)
    torch.testing.assert_close(mid.rest(mid.features().clone()), logits)
    with pytest.raises(DfkdError, match="cov=weights needs the input or output of the head"):
        mid.weight_correlation()
    mid.remove()
    with pytest.raises(DfkdError, match="no module 'featurez.3' in LeNet5; candidates"):
        FeatureSpace(teacher.net, teacher.spec.shape, "featurez.3")
    with pytest.raises(DfkdError, match="too many for a full covariance"):
        FeatureSpace(teacher.net, teacher.spec.shape, "features.0")


def test_repair_psd_clips_negative_eigenvalues_and_refuses_nan():
    cov = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    factor, clipped = repair_psd(cov)
    assert clipped == 1
    torch.testing.assert_close(factor @ factor.t(), torch.tensor([[1.5, 1.5], [1.5, 1.5]]))
    singular = torch.ones(3, 3)
    factor, clipped = repair_psd(singular)
    torch.testing.assert_close(factor @ factor.t(), singular, atol=1e-5, rtol=0)
    with pytest.raises(DfkdError, match="non-finite entries"):
        repair_psd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_shrunk_covariance_is_positive_definite_from_few_samples():
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    assert torch.linalg.eigvalsh(shrunk_covariance(x)).min() > 0


@pytest.mark.parametrize("cov", ["weights", "bn", "bootstrap"])
def test_mvn_round_is_valid_reproducible_and_reports_mismatch(cov):
    teacher = _random("lenet5")
    a = create_synthesizer("mvn", teacher, {**TINY, "cov": cov}, seed=1)
    b = create_synthesizer("mvn", teacher, {**TINY, "cov": cov}, seed=1)
    batch = a.synthesize(None, 0)
    assert batch["x"].shape == (20, 1, 32, 32) and 0 <= batch["x"].min() <= batch["x"].max() <= 1
    assert torch.equal(batch["x"], b.synthesize(None, 0)["x"])
    assert torch.equal(batch["target_logits"], teacher(batch["x"]).float())
    report = a.report()
    assert 0 <= report["label_mismatch"] <= 1 and report["feature_dim"] == 84
    assert report["mean_source"] == "bn" and report["nonneg"] is True


@pytest.mark.parametrize("method", ["mvn", "deepinv"])
def test_inversion_views_give_valid_reproducible_rounds_that_differ(method):
    """`view` changes what the teacher sees while the inputs are optimized, so the rounds
    differ; each stays a valid, reproducible batch of images."""
    teacher = _random("lenet5")
    opts = {**TINY} if method == "mvn" else {"batch_size": 20, "steps": 5}
    rounds = {}
    for view in ("roll", "affine", "none"):
        x = create_synthesizer(method, teacher, {**opts, "view": view}, 1).synthesize(None, 0)["x"]
        again = create_synthesizer(method, teacher, {**opts, "view": view}, 1)
        assert torch.equal(x, again.synthesize(None, 0)["x"])
        assert x.shape == (20, 1, 32, 32) and 0 <= x.min() <= x.max() <= 1
        rounds[view] = x
    assert not torch.equal(rounds["roll"], rounds["affine"])
    assert not torch.equal(rounds["affine"], rounds["none"])


def test_mvn_samples_are_rectified_and_targets_follow_the_head(digits_teacher):
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    synth = create_synthesizer("mvn", teacher, {**TINY, "center_steps": 100}, seed=0)
    y = torch.arange(10).repeat(20)
    h, logits = synth.sampled_features(y, torch.Generator().manual_seed(0))
    assert (h >= 0).all() and h.shape == (200, 128)
    torch.testing.assert_close(logits, teacher.net.fc(h))
    assert synth.report()["label_mismatch"] < 0.2


def test_mvn_synthesis_matches_the_soft_targets(digits_teacher):
    """More steps bring the teacher's output on x closer to the round's own soft targets (the
    paper's loss: no image priors)."""
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    losses = []
    for steps in (0, 40):
        synth = create_synthesizer("mvn", teacher, {**TINY, **PAPER, "steps": steps}, seed=0)
        x = synth.synthesize(None, 0)["x"]
        gen = synth.rng(0)  # replay the round's draws: classes, then soft targets
        y = balanced_targets(20, 10, gen)
        _, target_logits = synth.sampled_features(y, gen)
        target = torch.softmax(target_logits / 20, dim=1)
        losses.append(float(soft_target_loss(teacher(x), target, 20.0)))
    assert losses[1] < 0.5 * losses[0]


def test_mvn_option_errors():
    teacher = _random("lenet5")
    with pytest.raises(DfkdError,
                       match="unknown cov 'magic'; choose one of: weights, bn, bootstrap"):
        create_synthesizer("mvn", teacher, {"cov": "magic"}, 0)
    with pytest.raises(DfkdError, match="unknown view 'warp'; choose one of: affine, roll, crop, "
                       "none"):
        create_synthesizer("mvn", teacher, {"view": "warp"}, 0)
    with pytest.raises(DfkdError, match="unknown view 'warp'; choose one of: affine, roll, crop, "
                       "none"):
        create_synthesizer("deepinv", teacher, {"view": "warp"}, 0)
    with pytest.raises(DfkdError, match="sigma and temperature must be positive"):
        create_synthesizer("mvn", teacher, {"sigma": "0"}, 0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 10))
    t = Classifier(plain, teacher.spec, "plain").eval().requires_grad_(False)
    with pytest.raises(DfkdError, match="mean=bn needs a BatchNorm"):
        create_synthesizer("mvn", t, {"mean": "bn"}, 0)
    report = create_synthesizer("mvn", t, TINY, 0).report()  # no BatchNorm: documented fallback
    assert report["mean_source"] == "bootstrap" and report["bn_prior"] is False
    assert create_synthesizer("mvn", teacher, TINY, 0).report()["bn_prior"] is True


def test_class_similarity_and_dirichlet():
    w = torch.randn(10, 84, generator=torch.Generator().manual_seed(0))
    c = class_similarity(w)
    assert torch.allclose(c.diagonal(), torch.ones(10)) and c.min() >= 0 and c.max() <= 1
    alpha = 0.1 * c + 1e-4
    torch.manual_seed(0)
    a = sample_dirichlet(alpha, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    b = sample_dirichlet(alpha, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    torch.testing.assert_close(a.sum(1), torch.ones(10))
    big = sample_dirichlet(torch.full((4000, 3), 2.0), torch.Generator().manual_seed(2))
    torch.testing.assert_close(big.mean(0), torch.full((3,), 1 / 3), atol=0.02, rtol=0)


def test_zskd_round_and_label_mismatch_above_mvn(digits_teacher):
    teacher = load_classifier(digits_teacher).eval().requires_grad_(False)
    zskd = create_synthesizer("zskd", teacher, {"batch_size": 200, "steps": 2}, seed=0)
    batch = zskd.synthesize(None, 0)
    assert batch["x"].shape == (200, 1, 8, 8) and batch["classes"].shape == (200,)
    mvn = create_synthesizer("mvn", teacher, {**TINY, "batch_size": 200, "steps": 0,
                                              "center_steps": 100}, seed=0)
    mvn.synthesize(None, 0)
    assert zskd.report()["label_mismatch"] > 0.1
    assert mvn.report()["label_mismatch"] < zskd.report()["label_mismatch"]


def test_soft_target_loss_golden_value():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    # KL row 1: sum p log(p / q) with q = softmax(1, 2, 3); row 2: log 3 (q uniform, p one-hot)
    q = torch.softmax(logits[0], 0)
    expected = 0.5 * (float((target[0] * (target[0] / q).log()).sum()) + float(torch.log(
        torch.tensor(3.0))))
    assert float(soft_target_loss(logits, target, 1.0)) == pytest.approx(expected, rel=1e-5)
    assert float(soft_target_loss(logits[:1], torch.softmax(logits[:1] / 4, 1), 4.0)) == \
        pytest.approx(0.0, abs=1e-6)
