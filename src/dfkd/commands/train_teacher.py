"""`dfkd train-teacher`: a sound supervised recipe, resumable per epoch, saved as safetensors.

Recipe: SGD (Nesterov, momentum 0.9, weight decay 5e-4), cosine learning rate, random shifts
(plus horizontal flips on natural-image datasets). The test split only reports accuracy.

Two options make the teachers a backdoor defence is tested on (dfkd.backdoor): `--poison` plants
a trigger by data poisoning (a fixed share of the training images, drawn from other classes, get
the trigger, stamped after augmentation so that it stays where it is, and the target's label),
and `--init` starts from existing weights instead of a fresh network, which is how a poisoned
model is usually made from a good one (fine-tuning).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfkd.accel import pick_device
from dfkd.backdoor import Trigger, poisoned_indices
from dfkd.checkpoint import load_checkpoint, save_checkpoint
from dfkd.config import option, prepare_run_dir
from dfkd.data import DATASETS, fit_to_input, load_dataset
from dfkd.data.augment import FLIP_DATASETS, default_shift, shift_flip
from dfkd.errors import DfkdError
from dfkd.evaluate import eval_data_for, metrics, model_asr, predict_logits
from dfkd.io import append_jsonl, read_jsonl, truncate_jsonl, write_json, write_text
from dfkd.models.classifier import (
    Classifier,
    InputSpec,
    default_input_shape,
    load_classifier,
    new_classifier,
    save_classifier,
)
from dfkd.optim import cosine_lr, make_optimizer
from dfkd.report import save_curves

DEFAULT_EPOCHS = {"digits": 40, "mnist": 10, "fashion-mnist": 20, "svhn": 30, "cifar10": 200,
                  "cifar100": 200, "folder": 30}


@dataclass
class TeacherConfig:
    dataset: str = option("digits", "training dataset", choices=DATASETS)
    model: str = option("digits_cnn", "zoo name or package.module:factory")
    out: str = option("runs/teacher", "run directory")
    data_root: str | None = option(None, "where the dataset's files are")
    epochs: int | None = option(None, "epochs (default: the dataset's, DEFAULT_EPOCHS)")
    batch_size: int = option(128, "minibatch")
    lr: float = option(0.05, "learning rate, cosine-decayed")
    optimizer: str = option("sgd", "sgd (Nesterov momentum 0.9) or adam", choices=("sgd", "adam"))
    weight_decay: float = 5e-4
    input_shape: list[int] | None = option(None, "input shape (default: the zoo model's, "
                                           "channels from the dataset)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    init: str = option("", "fine-tune these weights (run directory, .safetensors or state-dict "
                       "file; --model names their architecture) instead of a fresh network")
    mean: list[float] | None = option(None, "input normalization mean (default: the weights' "
                                      "spec with --init, else the training set's)")
    std: list[float] | None = option(None, "input normalization std (default: as --mean)")
    poison: str = option("", "plant a backdoor by data poisoning with this trigger: badnets or "
                         "blend, with options, e.g. badnets:target=0,size=3 (dfkd.backdoor)")
    poison_rate: float = option(0.1, "share of the training images that carry the trigger")


def train_teacher(cfg: TeacherConfig, *, resume: bool = False, progress: bool = True,
                  command: str = "") -> dict:
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    trigger = Trigger.parse(cfg.poison) if cfg.poison else None
    torch.manual_seed(cfg.seed)
    model = _start(cfg, train).to(device)
    spec = model.spec
    x_train = fit_to_input(train.images, spec.shape, name=train.name)
    y_train = train.labels.clone()
    poisoned = torch.zeros(len(y_train), dtype=torch.bool)
    if trigger:
        trigger.check(spec.num_classes, spec.shape)
        poisoned[poisoned_indices(y_train, trigger, cfg.poison_rate,
                                  torch.Generator().manual_seed(cfg.seed))] = True
        y_train[poisoned] = trigger.target
    evaluation = eval_data_for(test, model)
    prepare_run_dir(out, cfg, resume, command)

    epochs = cfg.epochs or DEFAULT_EPOCHS.get(cfg.dataset, 30)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    base_lr = optimizer.param_groups[0]["lr"]
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    state = {"epoch": 0, "seconds": 0.0}
    if resume and ckpt_path.exists():
        load_checkpoint(ckpt_path, model.net, optimizer, gen, state)
        truncate_jsonl(metrics_path, "epoch", state["epoch"])
    else:
        metrics_path.unlink(missing_ok=True)

    shift = default_shift(spec.shape[1])
    flip = cfg.dataset in FLIP_DATASETS
    steps_per_epoch = max(1, len(x_train) // cfg.batch_size)
    bar = tqdm(total=epochs, initial=state["epoch"], desc=f"train {cfg.model} on {cfg.dataset}",
               unit="epoch", disable=not progress)
    while state["epoch"] < epochs:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            cosine_lr(optimizer, base_lr, (state["epoch"] * steps_per_epoch + i)
                      / (epochs * steps_per_epoch))
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = shift_flip(x_train[idx], gen, shift, flip)
            if trigger and poisoned[idx].any():
                x[poisoned[idx]] = trigger.stamp(x[poisoned[idx]])
            x = x.to(device)
            loss = F.cross_entropy(model(x), y_train[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        state["epoch"] += 1
        state["seconds"] += time.perf_counter() - t0
        acc = metrics(predict_logits(model, evaluation.x), evaluation.y)["acc"]
        append_jsonl(metrics_path, {"epoch": state["epoch"], "step": state["epoch"],
                                    "seconds": round(state["seconds"], 3),
                                    "loss": total / steps_per_epoch, "student_acc": acc,
                                    "teacher_passes": state["epoch"] * steps_per_epoch
                                    * cfg.batch_size})
        save_checkpoint(ckpt_path, model.net, optimizer, gen, state)
        bar.set_postfix(loss=f"{total / steps_per_epoch:.4f}", test_acc=f"{acc:.4f}")
        bar.update(1)
    bar.close()

    final = metrics(predict_logits(model, evaluation.x), evaluation.y)
    save_classifier(model, out / "teacher.safetensors")
    asr = {}
    if trigger:
        asr = {"trigger": trigger.spec(), "poison_rate": cfg.poison_rate,
               "poisoned_images": int(poisoned.sum()),
               "asr": model_asr(model, evaluation, trigger)}
    report = {"model": cfg.model, "dataset": cfg.dataset, "test_acc": final["acc"], **asr,
              "per_class_acc": final["per_class_acc"], "ece": final["ece"], "epochs": epochs,
              "train_seconds": round(state["seconds"], 3), "seed": cfg.seed,
              "input_shape": list(spec.shape), "mean": list(spec.mean), "std": list(spec.std),
              "num_classes": spec.num_classes, "device": str(device), "torch": torch.__version__}
    write_json(out / "report.json", report)
    write_text(out / "report.md", "\n".join([
        f"# Teacher: {cfg.model} on {cfg.dataset}", "", "| | |", "|---|---|",
        f"| test accuracy | {100 * final['acc']:.2f}% |", f"| epochs | {epochs} |",
        *([f"| backdoor | {asr['trigger']} on {asr['poisoned_images']} training images, "
           f"attack success {100 * asr['asr']:.2f}% |"] if asr else []),
        f"| training time | {state['seconds']:.1f} s |",
        f"| input | {'x'.join(map(str, spec.shape))}, mean {spec.mean}, std {spec.std} |", ""]))
    save_curves(read_jsonl(metrics_path), out / "curves.png",
                f"teacher {cfg.model} on {cfg.dataset} (test accuracy per epoch)")
    return report


def _start(cfg: TeacherConfig, train) -> Classifier:
    """A fresh network for the training set, or the weights of --init to fine-tune (their spec
    kept, so a published model keeps the normalization it was trained with)."""
    mean, std = (tuple(v) if v else None for v in (cfg.mean, cfg.std))
    if cfg.init:
        model = load_classifier(cfg.init, arch=cfg.model or None, mean=mean, std=std,
                                input_shape=tuple(cfg.input_shape) if cfg.input_shape else None)
        if model.spec.num_classes != train.num_classes:
            raise DfkdError(f"--init has {model.spec.num_classes} classes, {cfg.dataset} has "
                            f"{train.num_classes}")
        model.spec = dataclasses.replace(model.spec, dataset=cfg.dataset)
        return model
    default = default_input_shape(cfg.model)
    shape = tuple(cfg.input_shape) if cfg.input_shape else (
        (train.shape[0], *default[1:]) if default else train.shape)
    spec = InputSpec(shape, mean or train.mean, std or train.std, train.num_classes, cfg.dataset)
    return new_classifier(cfg.model, spec)
