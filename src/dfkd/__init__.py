"""dfkd: data-free knowledge distillation.

Synthesize a transfer set from a trained teacher alone, distill a small student on it, and
report honestly how close the student came.
"""

__version__ = "0.1.0"
