"""Accelerator settings: bf16 autocast, channels_last, torch.compile.

Synthesis spends nearly all its time in teacher forward/backward passes, so these settings are
where speed comes from on a GPU. They change how the teacher runs, never what it computes beyond
rounding: the BatchNorm prior is measured in float32 (see `dfkd.hooks.BNStatsHook`) and BN
forward hooks keep firing under `torch.compile`. `compile` also compiles the student's training
passes (not its evaluation), which on a CPU pays for a ResNet-sized pair (docs/teachers.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dfkd.config import PRECISIONS
from dfkd.errors import DfkdError, require_one_of
from dfkd.models.classifier import Classifier


@dataclass(frozen=True)
class Accel:
    """How to run the teacher: precision (fp32 | bf16 autocast), channels_last, compile."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, cfg) -> Accel:
        """The settings a run's config names (its precision, channels_last and compile)."""
        return cls(cfg.precision, cfg.channels_last, cfg.compile)

    def __post_init__(self):
        require_one_of("precision", self.precision, PRECISIONS)

    @property
    def label(self) -> str:
        """Short name for tables: 'fp32', 'bf16+channels_last', 'bf16+channels_last+compile'."""
        flags = [f for f, on in (("channels_last", self.channels_last),
                                 ("compile", self.compile)) if on]
        return "+".join([self.precision, *flags])

    def prepare(self, classifier: Classifier) -> Classifier:
        """Convert `classifier.net` in place (memory format, compiled wrapper); returns it.

        For teachers that are only run: a compiled net's state_dict keys gain an `_orig_mod.`
        prefix. Compilation is lazy (first forward). Dynamo traces the forward hooks that exist
        at that point (the BN hooks' side effects replay after the compiled graph), but by
        default it does not guard on hooks, so hooks registered after the first call would be
        silently skipped; we turn those guards on so that adding or removing hooks recompiles.
        """
        if self.channels_last:
            classifier.net = classifier.net.to(memory_format=torch.channels_last)
        if self.compile:
            # imported here: torch._dynamo adds about a second to `import dfkd`
            from torch._dynamo.eval_frame import OptimizedModule

            if not isinstance(classifier.net, OptimizedModule):
                classifier.net = _compiled(classifier.net)
        return classifier

    def training_view(self, student: Classifier) -> nn.Module:
        """What the student's training passes call: the student itself, or with `compile` a
        compiled view of it. The view shares the student's parameters and buffers, so the
        optimizer, checkpoints, evaluation and the saved weights keep using the plain module
        (and its plain state_dict keys)."""
        return _compiled(student) if self.compile else student

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device's type for precision 'bf16', else a no-op context."""
        if self.precision == "bf16":
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _compiled(module: nn.Module) -> nn.Module:
    from torch._dynamo import config as dynamo_config

    # Process-wide dynamo setting: hooks added or removed later (a BN prior, a loss's feature
    # taps) recompile instead of being silently skipped; correctness beats a cheaper guard check.
    dynamo_config.skip_nnmodule_hook_guards = False
    return torch.compile(module)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DfkdError(f"--device {name} asked for, but CUDA is not available here; use cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
