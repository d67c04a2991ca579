"""Options given as `key=value` strings (`--set`, `--loss-set`, `--update-set`) into the Options
dataclass of a method, a student loss or a student update, with one-line errors."""

from __future__ import annotations

import dataclasses
import typing

from dfkd.errors import DfkdError


def build_options(options_cls: type, given: dict[str, object], owner: str) -> object:
    """An Options dataclass from `key=value` strings or values: unknown names and values of the
    wrong type are one-line errors naming `owner` (e.g. "student loss 'fa'")."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values = {}
    for key, raw in given.items():
        if key not in fields:
            raise DfkdError(f"{owner} has no option '{key}'; options: "
                            f"{', '.join(fields) or '(none)'}")
        values[key] = _coerce(raw, hints[key], f"{owner} option '{key}'")
    return options_cls(**values)


def _coerce(raw, kind, what: str):
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(raw)
        return raw
    except ValueError:
        raise DfkdError(f"{what} expects {getattr(kind, '__name__', kind)}, got '{raw}'") from None
