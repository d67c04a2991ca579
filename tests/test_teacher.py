import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfkd.errors import DfkdError
from dfkd.models.classifier import (
    Classifier,
    InputSpec,
    build_net,
    load_classifier,
    new_classifier,
    save_classifier,
)

SPEC = InputSpec((1, 8, 8), (0.3,), (0.4,), 10, "digits")


def _model():
    torch.manual_seed(0)
    return new_classifier("digits_cnn_quarter", SPEC).eval()


def test_safetensors_round_trip_keeps_spec_arch_and_outputs(tmp_path):
    model = _model()
    save_classifier(model, tmp_path / "m.safetensors")
    loaded = load_classifier(tmp_path / "m.safetensors").eval()
    assert loaded.spec == SPEC and loaded.arch == "digits_cnn_quarter"
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_run_directory_is_found(tmp_path):
    save_classifier(_model(), tmp_path / "student.safetensors")
    assert load_classifier(tmp_path).arch == "digits_cnn_quarter"


def test_state_dict_file_needs_spec_flags_then_loads(tmp_path):
    model = _model()
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.net.state_dict().items()}}, path)
    with pytest.raises(DfkdError, match="--arch"):
        load_classifier(path)
    with pytest.raises(DfkdError, match="--input-shape C,H,W --mean M --std S"):
        load_classifier(path, arch="digits_cnn_quarter", input_shape=None)
    loaded = load_classifier(path, arch="digits_cnn_quarter", input_shape=(1, 8, 8),
                             mean=(0.3,), std=(0.4,))
    assert loaded.spec.num_classes == 10  # inferred from the head
    assert torch.equal(loaded.eval()(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))


def test_pickled_model_is_refused_with_one_line(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_model().net, path)
    with pytest.raises(DfkdError, match="pickled Python code") as e:
        load_classifier(path, arch="digits_cnn_quarter")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,content", [("notes.pt", b"hello"), ("x.safetensors", b"garbage")])
def test_non_weights_files_get_one_line_errors(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DfkdError, match="not a") as e:
        load_classifier(tmp_path / name, arch="lenet5")
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    save_classifier(_model(), tmp_path / "m.safetensors")
    with pytest.raises(DfkdError, match="do not fit architecture 'digits_cnn'"):
        load_classifier(tmp_path / "m.safetensors", arch="digits_cnn")


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DfkdError, match="does not exist"):
        load_classifier(tmp_path / "nope")
    with pytest.raises(DfkdError, match="no weights in"):
        load_classifier(tmp_path)


def test_spec_input_shape_the_model_cannot_take(tmp_path):
    save_classifier(_model(), tmp_path / "m.safetensors")
    with pytest.raises(DfkdError, match="cannot take input 1x32x32"):
        load_classifier(tmp_path / "m.safetensors", input_shape=(1, 32, 32))


def test_user_factory_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def mlp(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(),\n"
        "                         nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_net("my_models:mlp", 3, (1, 4, 4))
    assert net(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    spec = InputSpec((1, 4, 4), (0.5,), (0.5,), 3)
    model = Classifier(net, spec, "my_models:mlp")
    save_classifier(model, tmp_path / "mlp.safetensors")
    assert load_classifier(tmp_path / "mlp.safetensors").arch == "my_models:mlp"
    with pytest.raises(DfkdError, match="cannot load architecture 'my_models:nope'"):
        build_net("my_models:nope", 3, (1, 4, 4))
    sys.modules.pop("my_models", None)


def test_mean_std_per_channel_validation():
    assert InputSpec((3, 4, 4), (0.5,), (0.2,), 2).mean == (0.5, 0.5, 0.5)
    with pytest.raises(DfkdError, match="one value or 3"):
        InputSpec((3, 4, 4), (0.5, 0.5), (0.2,), 2)


def test_plain_safetensors_without_metadata(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save_file(net.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(DfkdError, match="does not say its architecture"):
        load_classifier(tmp_path / "plain.safetensors")
