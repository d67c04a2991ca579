"""Synthesis methods, one module per family, all behind `Synthesizer` (see base.py).

Every module of this folder is imported here, so a method registers itself (`@register_method`)
by being a file in it: no list to extend."""

import importlib
import pkgutil

from dfkd.synthesis.base import (
    Batch,
    Synthesizer,
    create_synthesizer,
    list_methods,
    method_class,
    methods_markdown,
    parse_options,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Batch", "Synthesizer", "create_synthesizer", "list_methods", "method_class",
           "methods_markdown", "parse_options"]
