"""Accuracy, teacher-student agreement, per-class accuracy and calibration on labelled data.

Evaluation data only ever *reports*: nothing here feeds back into training or model choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd.backdoor import Trigger, attack_success_rate
from dfkd.data import ImageDataset, fit_to_input, load_dataset
from dfkd.errors import DfkdError
from dfkd.hooks import eval_mode
from dfkd.models.classifier import Classifier


@dataclass
class EvalData:
    """A labelled split already fitted to a model's input shape (float pixels in [0,1])."""

    name: str
    x: torch.Tensor
    y: torch.Tensor


def eval_data_for(dataset: ImageDataset, model: Classifier) -> EvalData:
    """Bring a dataset to the model's input (pad or resize) and check the class count fits."""
    if dataset.num_classes > model.spec.num_classes:
        raise DfkdError(f"dataset '{dataset.name}' has {dataset.num_classes} classes but the model "
                        f"outputs {model.spec.num_classes}; evaluate on a matching dataset")
    return EvalData(dataset.name, fit_to_input(dataset.images, model.spec.shape, name=dataset.name),
                    dataset.labels)


def load_eval_data(name: str, model: Classifier, root=None, split: str = "test") -> EvalData:
    return eval_data_for(load_dataset(name, split, root=root), model)


@torch.no_grad()
def predict_logits(model: Classifier, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    device = model.mean.device
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017)."""
    conf, pred = logits.softmax(1).max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (conf[m].mean() - correct[m].mean()).abs()
    return float(ece)


def metrics(logits: torch.Tensor, labels: torch.Tensor,
            reference_logits: torch.Tensor | None = None) -> dict:
    """acc, per-class acc, ECE, and agreement with a reference model (the teacher) if given."""
    pred = logits.argmax(1)
    k = logits.shape[1]
    per_class = [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else None
                 for c in range(k)]
    out = {"acc": float((pred == labels).float().mean()),
           "per_class_acc": per_class,
           "ece": expected_calibration_error(logits, labels)}
    if reference_logits is not None:
        out["agreement"] = float((pred == reference_logits.argmax(1)).float().mean())
    return out


def model_asr(model: Classifier, data: EvalData, trigger: Trigger) -> float:
    """The attack success rate of `trigger` on `model` over labelled data, the trigger checked
    against the model's classes and input first."""
    trigger.check(model.spec.num_classes, model.spec.shape)
    return attack_success_rate(lambda x: predict_logits(model, x), data.x, data.y, trigger)
