"""Teachers trained elsewhere: the published CIFAR ResNets' format (stand-ins written here),
the MLP family, and bench suites built on a published checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import dfkd.commands.bench as bench
from dfkd.commands.bench import BenchConfig, run_bench
from dfkd.commands.suites import IMAGENET_MEAN, IMAGENET_STD, Published, Suite
from dfkd.errors import DfkdError
from dfkd.models import create_model, default_student, is_registered
from dfkd.models.classifier import load_classifier
from dfkd.models.resnet_a import PadShortcut
from dfkd.student.start import misfits
from test_data import write_cifar10, write_idx_split

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar10"


def save_as_published(net: torch.nn.Module, path: Path) -> None:
    """As akamaster/pytorch_resnet_cifar10 saved its models: a nested dict beside the best
    precision, keys prefixed by DataParallel's `module.`."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"best_prec1": 91.0, "state_dict": state}, path)


def test_a_published_checkpoint_loads_as_published(tmp_path):
    torch.manual_seed(0)
    net = create_model("resnet8a").eval()
    with torch.no_grad():  # running statistics of its own, so that a mix-up would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    save_as_published(net, tmp_path / "resnet8-00000000.th")
    model = load_classifier(tmp_path / "resnet8-00000000.th", arch="resnet8a",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert model.spec.shape == (3, 32, 32) and model.spec.num_classes == 10
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net((x - mean) / std), atol=1e-6)
    assert type(model.net.linear) is torch.nn.Linear  # the published head's name
    with pytest.raises(DfkdError, match="do not fit architecture 'resnet20a'"):
        load_classifier(tmp_path / "resnet8-00000000.th", arch="resnet20a",
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    net = create_model("resnet20a")
    assert sum(p.numel() for p in net.parameters()) == 269_722  # He et al. table 6: 0.27M


@pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models/cifar10 not present")
def test_the_real_published_checkpoints_load():
    for arch, name in (("resnet20a", "resnet20-12fca82f.th"),
                       ("resnet56a", "resnet56-4bfd9763.th")):
        model = load_classifier(SHARED_MODELS / name, arch=arch, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD)
        assert model.spec.num_classes == 10


def test_the_resnet_a_family_starts_a_shallower_student_from_the_teacher():
    assert default_student("resnet20a") == "resnet8a"
    assert default_student("resnet56a") == "resnet20a"
    assert misfits(create_model("resnet8a"), create_model("resnet20a")) == []
    assert misfits(create_model("resnet20a"), create_model("resnet56a")) == []


def test_mlp_widths_are_in_the_name_and_the_input_size_follows_the_spec(tmp_path):
    assert is_registered("mlp_64_32") and not is_registered("mlp_") and not is_registered("mlp_x")
    net = create_model("mlp_64_32_16")
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [64, 32, 16, 10] and linears[0].in_features == 784
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 3
    cifar = create_model("mlp", in_channels=3, input_shape=(3, 32, 32))
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert default_student("mlp") == "mlp_half"
    with pytest.raises(DfkdError, match="positive hidden widths, got \\(64, 0\\)"):
        create_model("mlp_64_0")
    assert misfits(create_model("mlp_half"), create_model("mlp")) == []


def _published_suite(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A cifar10 suite on a stand-in published ResNet-8 named by its hash, tiny CIFAR files."""
    torch.manual_seed(0)
    models = tmp_path / "models"
    models.mkdir()
    save_as_published(create_model("resnet8a"), models / "stand-in.th")
    digest = hashlib.sha256((models / "stand-in.th").read_bytes()).hexdigest()[:8]
    name = f"resnet8-{digest}.th"
    (models / "stand-in.th").rename(models / name)
    monkeypatch.setitem(bench.SUITES, "tiny-published", Suite(
        "cifar10", "resnet8a", "resnet8a", "2steps",
        published=Published(name, IMAGENET_MEAN, IMAGENET_STD, "this test")))
    data = tmp_path / "data"
    write_cifar10(data / "cifar-10-batches-py")
    return models, data


def test_a_published_suite_runs_the_same_file_for_every_seed(tmp_path, monkeypatch):
    models, data = _published_suite(tmp_path, monkeypatch)
    cfg = BenchConfig(suite="tiny-published", methods="noise", seeds=2, out=str(tmp_path / "b"),
                      data_root=str(data), models_root=str(models), device="cpu",
                      eval_points=1, method_options={"noise.batch_size": 4,
                                                     "kd_real.batch_size": 4,
                                                     "scratch_real.batch_size": 4})
    records = run_bench(cfg, progress=False)
    assert len(records) == 6 and not [r for r in records if "error" in r]
    assert len({r["teacher"] for r in records}) == 1
    assert {r["teacher_arch"] for r in records} == {"resnet8a"}


def test_a_missing_or_different_published_file_is_one_line(tmp_path, monkeypatch):
    models, data = _published_suite(tmp_path, monkeypatch)
    cfg = BenchConfig(suite="tiny-published", methods="noise", seeds=1, out=str(tmp_path / "b"),
                      data_root=str(data), models_root=str(tmp_path / "nowhere"))
    with pytest.raises(DfkdError) as missing:
        run_bench(cfg, progress=False)
    message = str(missing.value)
    assert "\n" not in message and "needs the published teacher resnet8-" in message
    assert str(tmp_path / "nowhere") in message and "--models-root" in message
    assert not (tmp_path / "b" / "results.json").exists()
    other = next(models.iterdir())
    other.write_bytes(other.read_bytes() + b"\0")
    with pytest.raises(DfkdError, match="is not the published resnet8-"):
        run_bench(bench.dataclasses.replace(cfg, models_root=str(models)), progress=False)


def test_the_mnist_mlp_suite_trains_an_mlp_teacher_and_distills_a_narrower_one(tmp_path):
    data = tmp_path / "mnist"
    write_idx_split(data, "train", 64, gz=True)
    write_idx_split(data, "t10k", 20, gz=True)
    cfg = BenchConfig(suite="mnist-mlp", methods="deepinv", seeds=1, budget="3steps",
                      out=str(tmp_path / "b"), data_root=str(data), teacher_epochs=1,
                      teacher_cache=str(tmp_path / "cache"), device="cpu", eval_points=1,
                      method_options={"deepinv.batch_size": 8, "deepinv.steps": 2,
                                      "kd_real.batch_size": 8, "scratch_real.batch_size": 8})
    records = run_bench(cfg, progress=False)
    assert not [r for r in records if "error" in r]
    deepinv = records[-1]
    assert (deepinv["teacher_arch"], deepinv["student"]) == ("mlp", "mlp_half")
    assert deepinv["student_init"] == "teacher" and deepinv["plan"]["schedule"] == "planned"
