import math

import pytest
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import FeatureHook, bn_stats_hooks, get_module, muted
from dfkd.losses import js_divergence, kd_loss, total_variation


def test_kd_loss_golden_value():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    tau = 2.0
    p_t = torch.softmax(t / tau, 1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / tau, 1))).sum() * tau**2
    assert kd_loss(s, t, tau).item() == pytest.approx(manual.item(), rel=1e-6)
    # p_T and p_S are mirror images with log-ratios +-1: KL = p1 - p3, times tau^2 = 4
    assert kd_loss(s, t, tau).item() == pytest.approx(1.28063, abs=1e-4)
    assert kd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-7)


def test_js_divergence_properties():
    a, b = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(a, b).item() == pytest.approx(js_divergence(b, a).item())
    assert 0 < js_divergence(a, b).item() < math.log(2)
    huge = torch.tensor([[100.0, -100.0]])
    assert js_divergence(huge, -huge).item() == pytest.approx(math.log(2), rel=1e-4)


def test_total_variation_golden_values():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert total_variation(x, p=1).item() == pytest.approx(1.0)  # 0.5 rows + 0.5 cols
    assert total_variation(x, p=2).item() == pytest.approx(1.0)
    assert total_variation(torch.ones(1, 1, 4, 4)).item() == 0.0


def test_bn_hook_is_zero_on_matching_statistics_and_positive_otherwise():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(64, 3, 4, 4) * 2 + 1
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    model = nn.Sequential(bn).eval()
    (hook,) = bn_stats_hooks(model, "test")
    model(x)
    assert hook.loss.item() == pytest.approx(0.0, abs=1e-5)
    model(x + 1)
    assert hook.loss.item() == pytest.approx(math.sqrt(3), rel=1e-4)


def test_bn_hooks_refuse_teacher_without_batchnorm():
    with pytest.raises(DfkdError, match="no BatchNorm") as e:
        bn_stats_hooks(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "deepinv")
    assert "\n" not in str(e.value)


def test_get_module_by_path_and_error_lists_candidates():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    assert isinstance(get_module(model, "1.1"), nn.Linear)
    with pytest.raises(DfkdError, match="candidates: .*1.1"):
        get_module(model, "1.2")
    hook = FeatureHook(get_module(model, "1.1"), capture="input")
    model[1](torch.ones(1, 2))
    assert hook.value.shape == (1, 2)


def test_bn_hook_skips_no_grad_passes():
    """Labelling and evaluation passes run without autograd and never read the prior."""
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn).eval()
    (hook,) = bn_stats_hooks(model, "test")
    x = torch.randn(8, 3, 4, 4)
    model(x)
    assert hook.loss is not None
    with torch.no_grad():
        model(x)
    assert hook.loss is None


def test_muted_bn_hooks_keep_the_loss_of_the_pass_that_was_read():
    bn = torch.nn.BatchNorm2d(2).eval()
    hooks = bn_stats_hooks(torch.nn.Sequential(bn), "test")
    bn(torch.zeros(4, 2, 3, 3))
    read = hooks[0].loss
    with muted(hooks):
        bn(torch.randn(4, 2, 3, 3) + 5)  # CMI's local-view pass
    assert hooks[0].loss is read  # variance 0 against 1 in both channels: sqrt 2
    assert float(read) == pytest.approx(2 ** 0.5)
    bn(torch.randn(4, 2, 3, 3) + 5)
    assert float(hooks[0].loss) > 5  # unmuted again
