"""Every registered model builds, runs forward/backward, and honours the zoo's contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.models import create_model, is_registered, list_models, model_input_shape
from dfkd.models.registry import register_model

CLASSIFIERS = [
    "digits_cnn", "digits_cnn_quarter", "lenet5", "lenet5_half",
    "resnet8", "resnet18", "resnet20", "resnet32", "resnet34", "resnet56",
    "vgg8", "vgg11", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "resnet8a", "resnet14a", "resnet20a", "resnet32a", "resnet44a", "resnet56a", "resnet110a",
    "mlp", "mlp_half",
]  # fmt: skip
GENERATORS = {"generator_8": (1, 8), "generator_28": (1, 28), "generator_32": (3, 32)}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_holds_exactly_the_zoo() -> None:
    assert list_models("classifier") == sorted(CLASSIFIERS)
    assert list_models("generator") == sorted(GENERATORS)
    assert list_models() == sorted(CLASSIFIERS + list(GENERATORS))
    assert is_registered("resnet20") and not is_registered("resnet7")


@pytest.mark.parametrize("name", list_models("classifier"))
def test_classifier_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    head = getattr(model, "linear", None) or model.fc  # the published option-A ResNets: linear
    assert isinstance(head, nn.Linear) and head is list(model.modules())[-1]
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(2, *model_input_shape(name))
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        logits = model(x)
        assert logits.shape == (2, 10)
        assert torch.isfinite(logits).all()
        logits.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list_models("generator"))
def test_generator_contract(name: str) -> None:
    torch.manual_seed(0)
    channels, size = GENERATORS[name]
    gen = create_model(name, nz=16, ngf=8)
    z = torch.randn(2, 16, requires_grad=True)
    images = gen(z)
    assert images.shape == (2, channels, size, size)
    assert torch.isfinite(images).all()
    # A random projection: the output BN fixes each channel's norm, so sum(x^2) has no gradient.
    (images * torch.randn_like(images)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in gen.parameters())


def test_lenet5_options() -> None:
    model = create_model("lenet5", num_classes=100, in_channels=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_students_are_smaller() -> None:
    assert _params(create_model("lenet5_half")) < _params(create_model("lenet5"))
    assert 8 * _params(create_model("digits_cnn_quarter")) < _params(create_model("digits_cnn"))


def test_unknown_name_lists_choices_on_one_line() -> None:
    with pytest.raises(DfkdError) as info:
        create_model("resnet7")
    msg = str(info.value)
    assert "\n" not in msg and "'resnet7'" in msg
    assert all(n in msg for n in list_models())


def test_kind_and_kwargs_are_checked() -> None:
    with pytest.raises(DfkdError, match="is a generator"):
        create_model("generator_32", kind="classifier")
    with pytest.raises(DfkdError, match="does not accept nz"):
        create_model("resnet8", nz=3)
    with pytest.raises(DfkdError):
        model_input_shape("generator_8")
    with pytest.raises(DfkdError,
                       match="unknown kind 'clasifier'; choose one of: classifier, generator"):
        create_model("resnet8", kind="clasifier")


def test_registration_mistakes_are_one_line_errors() -> None:
    with pytest.raises(DfkdError, match="unknown kind .teacher.; choose one of: classifier"):
        register_model("net", kind="teacher", input_shape=(1, 8, 8))
    with pytest.raises(DfkdError, match="must declare their default input_shape"):
        register_model("net")
    with pytest.raises(DfkdError, match="'resnet8' is already registered"):
        register_model("resnet8", input_shape=(3, 32, 32))(lambda: nn.Linear(1, 1))
    assert list_models() == sorted(CLASSIFIERS + list(GENERATORS))
