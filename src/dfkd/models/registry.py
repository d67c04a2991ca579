"""Name -> factory registry, so configs and the CLI can pick architectures by string."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dfkd.errors import DfkdError, require_one_of

KINDS = ("classifier", "generator")

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    kind: str
    input_shape: tuple[int, int, int] | None


_REGISTRY: dict[str, _Entry] = {}
_FAMILIES: dict[str, tuple[re.Pattern, Callable[[re.Match], Factory], tuple[int, int, int]]] = {}


def register_model(
    name: str | None = None,
    *,
    kind: str = "classifier",
    input_shape: tuple[int, int, int] | None = None,
) -> Callable[[Factory], Factory]:
    """Decorator that registers a factory under `name` (default: the function's name)."""
    require_one_of("kind", kind, KINDS)
    if kind == "classifier" and input_shape is None:
        raise DfkdError("classifiers must declare their default input_shape (C, H, W)")

    def decorator(factory: Factory) -> Factory:
        key = name or factory.__name__
        if key in _REGISTRY:
            raise DfkdError(f"model {key!r} is already registered")
        _REGISTRY[key] = _Entry(factory, kind, input_shape)
        return factory

    return decorator


def register_family(label: str, pattern: str, factory_for: Callable[[re.Match], Factory], *,
                    input_shape: tuple[int, int, int]) -> None:
    """Classifiers named by a pattern whose parts are the options (`mlp_512_256`): a name that
    matches `pattern` in full builds `factory_for(match)`; `label` shows the form of the names
    (`dfkd models`)."""
    _FAMILIES[label] = (re.compile(pattern), factory_for, input_shape)


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def list_models(kind: str | None = None) -> list[str]:
    """Sorted registered names, optionally only those of one kind."""
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def is_registered(name: str) -> bool:
    return _lookup(name) is not None


def _lookup(name: str) -> _Entry | None:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for pattern, factory_for, shape in _FAMILIES.values():
        match = pattern.fullmatch(name)
        if match:
            return _Entry(factory_for(match), "classifier", shape)
    return None


def _entry(name: str, kind: str | None = None) -> _Entry:
    """Look a name up, failing with a one-line message that lists the valid choices."""
    if kind is not None:
        require_one_of("kind", kind, KINDS)
    entry = _lookup(name)
    choices = ", ".join(list_models(kind))
    if entry is None:
        raise DfkdError(f"unknown model {name!r}; choose one of: {choices}")
    if kind is not None and entry.kind != kind:
        raise DfkdError(f"model {name!r} is a {entry.kind}, not a {kind}; choose one of: {choices}")
    return entry


def create_model(name: str, *, kind: str | None = None, **kwargs: object) -> nn.Module:
    """Build a registered model; `kind` (optional) also checks it is a classifier/generator."""
    entry = _entry(name, kind)
    params = inspect.signature(entry.factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise DfkdError(
            f"model {name!r} does not accept {', '.join(unknown)}; it accepts: {', '.join(params)}"
        )
    return entry.factory(**kwargs)


def model_factory(name: str) -> Factory:
    """The factory of a registered classifier (one-line error for an unknown name)."""
    return _entry(name, "classifier").factory


def model_input_shape(name: str) -> tuple[int, int, int]:
    """Default (C, H, W) a registered classifier expects."""
    shape = _entry(name, "classifier").input_shape
    assert shape is not None  # enforced by register_model for classifiers
    return shape


def init_weights(model: nn.Module) -> nn.Module:
    """One init convention for every architecture: kaiming convs, identity BN, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


# The usual student of each zoo teacher (half width or depth, as in the papers' pairs): what
# `dfkd distill` trains when no --student is given.
DEFAULT_STUDENTS = {"lenet5": "lenet5_half", "digits_cnn": "digits_cnn_quarter",
                    "resnet34": "resnet18", "resnet56": "resnet20", "resnet32": "resnet20",
                    "resnet20": "resnet8", "vgg11": "vgg8", "wrn_40_2": "wrn_16_2",
                    "wrn_40_1": "wrn_16_1", "wrn_16_2": "wrn_16_1",
                    "resnet20a": "resnet8a", "resnet32a": "resnet8a", "resnet56a": "resnet20a",
                    "resnet110a": "resnet20a", "mlp": "mlp_half"}


def default_student(teacher_arch: str) -> str:
    """The zoo student for a zoo teacher; a clear error for any other teacher."""
    if teacher_arch not in DEFAULT_STUDENTS:
        raise DfkdError(f"no default student for a '{teacher_arch}' teacher; choose one with "
                        f"--student (a zoo name from `dfkd models` or package.module:factory)")
    return DEFAULT_STUDENTS[teacher_arch]
