"""Layer discovery shared by losses, feature space, quantization and federated code."""

import pytest
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import dummy_forward, eval_mode, head_path


def test_head_path_is_the_last_linear_and_explains_its_absence():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    assert head_path(net, "unused") == "2.0"
    with pytest.raises(DfkdError, match=r"^Sequential has no nn.Linear; set layer=X$"):
        head_path(nn.Sequential(nn.Conv2d(1, 1, 1)), "set layer=X")


def test_eval_mode_restores_the_mode_even_when_the_block_fails():
    net = nn.Sequential(nn.BatchNorm1d(3)).train()
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net):
        assert not net.training
        raise RuntimeError("inside")
    assert net.training
    with eval_mode(net.eval()):
        pass
    assert not net.training


def test_dummy_forward_leaves_batchnorm_statistics_alone():
    bn = nn.BatchNorm1d(3).train()
    dummy_forward(bn, (3,), bn.running_mean.device)
    assert bn.training and int(bn.num_batches_tracked) == 0
