"""Synthesis methods, one module per family, all behind `Synthesizer` (see base.py)."""

from dfkd.synthesis import (  # noqa: F401  (registers the methods)
    bns,
    cmi,
    deepinversion,
    fast,
    generative,
    mvn,
    nayer,
    noise,
    real_data,
    zskd,
)
from dfkd.synthesis.base import (
    Batch,
    Synthesizer,
    create_synthesizer,
    list_methods,
    method_class,
    methods_markdown,
    parse_options,
)

__all__ = ["Batch", "Synthesizer", "create_synthesizer", "list_methods", "method_class",
           "methods_markdown", "parse_options"]
