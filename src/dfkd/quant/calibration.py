"""Calibration inputs for quantization, from the model itself or (as the anchor) real data.

- gaussian: noise in the model's normalized input space (dfkd's `noise` method): what
  calibration looks like with no thought, and what the other sources must beat.
- inception: logit maximization, DeepInversion without the BatchNorm prior (`deepinv` with
  bn_weight=0): inputs each class's logit is high on ("Inceptionism").
- bns: BatchNorm-statistics matching (`bns`, The Knowledge Within).
- mixmix: BatchNorm statistics and classes of several models at once, with cut-mixed inputs
  (`mixmix`; `extra_teachers` are the other models).
- any other transfer-set method of `dfkd methods` (deepinv, mvn, cmi, ...), options as usual.
- real: a random sample of the model's training split (needs the files); the
  anchor the data-free sources are measured against, never a default.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from dfkd.data import fit_to_input, load_dataset
from dfkd.errors import DfkdError
from dfkd.models.classifier import Classifier
from dfkd.synthesis import create_synthesizer, method_class

SOURCES = {  # calibration name -> (dfkd method, options it sets)
    "gaussian": ("noise", {}),
    "inception": ("deepinv", {"bn_weight": 0.0}),
    "bns": ("bns", {}),
    "mixmix": ("mixmix", {}),
}


@dataclass
class Calibration:
    name: str
    x: torch.Tensor  # pixels in [0, 1], on the CPU
    seconds: float
    teacher_passes: int
    method: str | None  # the dfkd method that made it (None: real data)


def calibration_method(name: str) -> tuple[str, dict]:
    """The dfkd method (and its preset options) behind a calibration name; a one-line error
    for names that are neither a source nor a transfer-set method."""
    if name in SOURCES:
        return SOURCES[name]
    cls = method_class(name)  # unknown: one-line error listing the methods
    if cls.uses_real_data:
        raise DfkdError(f"'{name}' trains on real data; the real-data calibration is 'real'")
    if cls.family != "transfer_set":
        raise DfkdError(f"'{name}' is an online (generator) method that needs a student to train "
                        "against; calibrate with gaussian, inception, bns, mixmix or a "
                        "transfer-set method (deepinv, mvn, cmi, ...)")
    return name, {}


def make_calibration(name: str, model: Classifier, size: int, seed: int, *,
                     options: dict | None = None, dataset: str | None = None,
                     data_root: str | None = None, progress=None) -> Calibration:
    """`size` calibration inputs of source `name` for `model` (see the module docstring)."""
    if size <= 0:
        raise DfkdError(f"calibration size must be positive, got {size}")
    t0 = time.perf_counter()
    if name == "real":
        return Calibration(name, real_images(model, size, seed, dataset, data_root),
                           time.perf_counter() - t0, 0, None)
    method, preset = calibration_method(name)
    # a copy: synthesizers hook the model's layers, and the export of the model must not see them
    synth = create_synthesizer(method, copy.deepcopy(model), {**preset, **(options or {})}, seed)
    parts, n, index = [], 0, 0
    while n < size:
        x = synth.synthesize(None, index)["x"].cpu()
        parts.append(x)
        n += len(x)
        index += 1
        if progress is not None:
            progress(min(n, size))
    return Calibration(name, torch.cat(parts)[:size], time.perf_counter() - t0,
                       synth.teacher_passes, method)


def real_images(model: Classifier, size: int, seed: int, dataset: str | None,
                data_root: str | None) -> torch.Tensor:
    name = dataset or model.spec.dataset
    if not name:
        raise DfkdError("calibration 'real' needs the training data: the model records no "
                        "dataset, so pass --eval-dataset NAME (and --data-root PATH)")
    data = load_dataset(name, "train", root=data_root)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.labels), generator=gen)[:size]
    return fit_to_input(data.images[idx], model.spec.shape, name=name)
