"""Wrap any classifier with the input spec it expects, and load/save it as safetensors.

A `Classifier` takes images as pixels in [0, 1] and normalizes them itself, so synthesizers,
evaluation and the transfer set all speak one input space whatever the network was trained on.
The spec (shape, mean/std, classes, training dataset) and the architecture name travel inside
the safetensors metadata, so a weights file is enough to rebuild the model.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import eval_mode
from dfkd.io import atomic_path
from dfkd.models import is_registered, model_factory, model_input_shape

WEIGHT_FILES = ("student.safetensors", "teacher.safetensors", "model.safetensors")


@dataclass(frozen=True)
class InputSpec:
    """What a classifier expects: input shape (C,H,W), per-channel mean/std, classes."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    dataset: str | None = None

    def __post_init__(self):
        c = self.shape[0]
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "mean", _per_channel(self.mean, c, "mean"))
        object.__setattr__(self, "std", _per_channel(self.std, c, "std"))
        if any(s <= 0 for s in self.std):
            raise DfkdError(f"std must be positive, got {self.std}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        d = json.loads(text)
        return cls(tuple(d["shape"]), tuple(d["mean"]), tuple(d["std"]), int(d["num_classes"]),
                   d.get("dataset"))


def _per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise DfkdError(f"--{what} has {len(values)} values but the input has {channels} channels; "
                        f"give one value or {channels}")
    return values


class Classifier(nn.Module):
    """A network plus its InputSpec; `forward` takes [0,1] pixels, `net` takes normalized input."""

    def __init__(self, net: nn.Module, spec: InputSpec, arch: str):
        super().__init__()
        self.net, self.spec, self.arch = net, spec, arch
        shape = (1, spec.shape[0], 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(shape), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_net(arch: str, num_classes: int, shape: tuple[int, int, int]) -> nn.Module:
    """A zoo name or `package.module:factory`; the factory gets those of `num_classes`,
    `in_channels` and `input_shape` (C, H, W) it accepts."""
    if ":" not in arch:
        factory = model_factory(arch)
    else:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise DfkdError(f"cannot load architecture '{arch}': {e}; expected "
                            "package.module:factory importable from the current environment"
                            ) from None
    params = inspect.signature(factory).parameters
    given = {"num_classes": num_classes, "in_channels": shape[0], "input_shape": tuple(shape)}
    net = factory(**{k: v for k, v in given.items() if k in params})
    if not isinstance(net, nn.Module):
        raise DfkdError(f"'{arch}' returned {type(net).__name__}, not an nn.Module")
    return net


def default_input_shape(arch: str) -> tuple[int, int, int] | None:
    return model_input_shape(arch) if ":" not in arch and is_registered(arch) else None


def save_classifier(model: Classifier, path: Path, extra: Mapping[str, str] | None = None):
    """Weights as safetensors with spec and arch in the metadata; written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    meta = {"dfkd_spec": model.spec.to_json(), "dfkd_arch": model.arch, **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _find_weights(path: Path) -> Path:
    if not path.exists():
        raise DfkdError(f"'{path}' does not exist; pass a run directory or a weights file")
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise DfkdError(f"no weights in '{path}': expected one of {', '.join(WEIGHT_FILES)}")
    return path


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path), device="cpu"), meta
        except (SafetensorError, OSError, ValueError) as e:
            raise DfkdError(f"'{path}' is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # garbage, not a pickled object graph
            raise DfkdError(f"'{path}' is not a weights file (unreadable pickle)") from None
        raise DfkdError(f"'{path}' contains pickled Python code (a whole saved model?), which dfkd "
                        "refuses to run; save model.state_dict() instead, ideally as .safetensors"
                        ) from None
    except Exception as e:  # torch.load fails on non-weight files in many different ways
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DfkdError(f"'{path}' is not a weights file ({first[:200]})") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfkdError(f"'{path}' holds no state dict of tensors; save model.state_dict()")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    return state, {}


def _infer_num_classes(state: Mapping[str, torch.Tensor]) -> int:
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise DfkdError("cannot infer the number of classes from the weights; pass --num-classes K")
    return int(weights[-1].shape[0])


def load_classifier(path: str | Path, *, arch: str | None = None,
                    input_shape: tuple[int, int, int] | None = None,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    num_classes: int | None = None,
                    arch_hint: str = "pass --arch NAME (a zoo model) or --arch "
                                     "package.module:factory") -> Classifier:
    """Load weights (+ stored spec) into an architecture; CLI flags override the stored spec.
    `arch_hint` says how the caller's user names an architecture the weights do not."""
    file = _find_weights(Path(path))
    state, meta = _read_weights(file)
    arch = arch or meta.get("dfkd_arch")
    if not arch:
        raise DfkdError(f"'{file}' does not say its architecture; {arch_hint}")
    stored = InputSpec.from_json(meta["dfkd_spec"]) if "dfkd_spec" in meta else None
    shape = input_shape or (stored.shape if stored else default_input_shape(arch))
    mean = mean or (stored.mean if stored else None)
    std = std or (stored.std if stored else None)
    if shape is None or mean is None or std is None:
        raise DfkdError(f"'{file}' carries no input spec; pass --input-shape C,H,W --mean M "
                        "--std S (mean/std: one value or one per channel)")
    k = num_classes or (stored.num_classes if stored else _infer_num_classes(state))
    spec = InputSpec(shape, mean, std, k, stored.dataset if stored else None)
    net = build_net(arch, k, spec.shape)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise DfkdError(f"weights in '{file}' do not fit architecture '{arch}': {detail[:400]}"
                        ) from None
    model = Classifier(net, spec, arch)
    check_forward(model)
    return model


@torch.no_grad()
def check_forward(model: Classifier, hint: str = "check --input-shape") -> None:
    """Fail early, in one line, when the network cannot take its spec's input or count classes."""
    try:
        with eval_mode(model):
            out = model(torch.rand(2, *model.spec.shape, device=model.mean.device))
    except RuntimeError as e:
        shape = "x".join(map(str, model.spec.shape))
        raise DfkdError(f"model '{model.arch}' cannot take input {shape}: "
                        f"{str(e).splitlines()[0]}; {hint}") from None
    if out.ndim != 2 or out.shape[1] != model.spec.num_classes:
        raise DfkdError(f"model '{model.arch}' outputs shape {tuple(out.shape)}, expected "
                        f"(N, {model.spec.num_classes}) logits")


def new_classifier(arch: str, spec: InputSpec) -> Classifier:
    """A freshly initialised network for `spec` (students, teachers before training)."""
    model = Classifier(build_net(arch, spec.num_classes, spec.shape), spec, arch)
    check_forward(model, "choose a model made for this input size (`dfkd models`)")
    return model
