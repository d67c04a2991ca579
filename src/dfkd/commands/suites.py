"""The benchmark suites: which teacher, which student, which data, which budget.

A suite either trains its teacher (once per seed, cached by the bench) or uses a checkpoint
published by another project, as published: the same file for every seed, so the seed changes
only the synthesis and the student. Free of torch, so the CLI can list the suites cheaply.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from dfkd.errors import DfkdError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the published CIFAR ResNets were trained on inputs
IMAGENET_STD = (0.229, 0.224, 0.225)  # normalised by ImageNet's statistics
AKAMASTER = "github.com/akamaster/pytorch_resnet_cifar10, release 'pretrained'"


@dataclass(frozen=True)
class Published:
    """A teacher file published elsewhere (its architecture is the suite's `teacher`): its
    name (whose hex part is the start of its SHA-256, the torch.hub convention), input
    normalisation and origin."""

    file: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


@dataclass(frozen=True)
class Suite:
    dataset: str
    teacher: str  # zoo architecture of the teacher
    student: str
    budget: str  # the protocol's budget when --budget is not given
    needs_data_root: bool = True
    published: Published | None = None  # None: the bench trains the teacher per seed


SUITES = {
    "digits": Suite("digits", "digits_cnn", "digits_cnn_quarter", "60s", needs_data_root=False),
    "mnist": Suite("mnist", "lenet5", "lenet5_half", "5m"),
    # an MLP teacher (784-512-256-10, BatchNorm1d) trained on the MNIST files -> half its widths
    "mnist-mlp": Suite("mnist", "mlp", "mlp_half", "10m"),
    # ResNets trained on the MNIST files, their inversion steps (48 and 104 MFLOPs) between
    # the cheap teachers above and the CIFAR ResNets below, on either side of the auto rule's
    # threshold: ResNet-8 -> LeNet-5-half (another family, a random start), ResNet-14 -> ResNet-8
    # (a shallower copy)
    "mnist-r8": Suite("mnist", "resnet8a", "lenet5_half", "5m"),
    "mnist-r14": Suite("mnist", "resnet14a", "resnet8a", "5m"),
    # the published ResNet-20 -> the 8-layer ResNet of the same family: a shallower copy, so the
    # student may start from the teacher's first block of each stage
    "cifar10-r20": Suite("cifar10", "resnet20a", "resnet8a", "10m", published=Published(
        "resnet20-12fca82f.th", IMAGENET_MEAN, IMAGENET_STD, AKAMASTER)),
    # ResNet-56 -> ResNet-20 of the same family, the field's usual CIFAR pair (CRD, ...): a third
    # of the depth, and the published ResNet-20 shows that this student can reach 91.6%
    "cifar10-r56": Suite("cifar10", "resnet56a", "resnet20a", "30m", published=Published(
        "resnet56-4bfd9763.th", IMAGENET_MEAN, IMAGENET_STD, AKAMASTER)),
    "cifar10": Suite("cifar10", "resnet34", "resnet18", "1h"),
    "cifar100": Suite("cifar100", "resnet34", "resnet18", "1h"),
}
SUITE_NAMES = (*SUITES, "throughput")
DATASET_CHANNELS = {"digits": 1, "mnist": 1, "cifar10": 3, "cifar100": 3}


def models_root(given: str | None) -> Path:
    """Where published teacher files are looked for: --models-root, else $DFKD_MODELS, else
    ~/.cache/dfkd/models."""
    return Path(given or os.environ.get("DFKD_MODELS") or Path.home() / ".cache/dfkd/models")


def published_file(name: str, suite: Suite, root: str | None) -> Path:
    """The suite's published teacher file, checked against the hash in its name; a missing or
    different file is a one-line error naming the file and where it goes."""
    pub = suite.published
    path = models_root(root) / pub.file
    if not path.is_file():
        raise DfkdError(f"suite '{name}' needs the published teacher {pub.file} ({pub.source}) "
                        f"at {path}; put it there or pass --models-root DIR that holds it")
    digest = pub.file.rsplit("-", 1)[-1].split(".")[0]
    with path.open("rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if not actual.startswith(digest):
        raise DfkdError(f"'{path}' is not the published {pub.file} (its SHA-256 starts "
                        f"{actual[:8]}, not {digest}); replace it with the file from {pub.source}")
    return path
