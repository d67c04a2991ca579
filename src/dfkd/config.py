"""Run configurations as dataclasses, saved to config.yaml so any run can be rerun exactly."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dfkd.errors import DfkdError
from dfkd.io import write_text

# the student-side augmentations of stored samples (dfkd.data.augment applies them; kept
# here, free of torch, so that the CLI can offer them without importing it)
_BASE_AUGMENTATIONS = ("none", "shift", "shift+flip", "affine", "affine+flip")
AUGMENTATIONS = (*_BASE_AUGMENTATIONS, *(f"{b}+mix" for b in _BASE_AUGMENTATIONS[1:]))

# how a teacher may run (dfkd.accel.Accel), here for the same reason as AUGMENTATIONS
PRECISIONS = ("fp32", "bf16")

# how a transfer-set run is scheduled (dfkd.engine.plan), and the fixed schedule's student
# steps per round
SCHEDULES = ("planned", "fixed")
FIXED_STEPS_PER_ROUND = 200

# where the student's weights start (dfkd.student.start), here for the same reason
STUDENT_INITS = ("auto", "random", "teacher")

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


@dataclass(frozen=True)
class Budget:
    """How long the student trains: wall-clock seconds (`90s`, `10m`, `1h`) or `N` steps."""

    seconds: float | None = None
    steps: int | None = None

    @classmethod
    def parse(cls, text: str | int) -> Budget:
        text = str(text).strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)", text)
        if m:
            return cls(seconds=float(m.group(1)) * _UNITS[m.group(2)])
        m = re.fullmatch(r"(\d+)\s*(steps?)?", text)
        if m:
            return cls(steps=int(m.group(1)))
        raise DfkdError(f"cannot read budget '{text}'; use wall clock like 90s, 10m, 1h or steps "
                        "like 500steps")

    def progress(self, step: int, seconds: float) -> float:
        """Fraction of the budget used, in [0, 1]."""
        p = step / self.steps if self.steps is not None else seconds / self.seconds
        return min(max(p, 0.0), 1.0)

    def done(self, step: int, seconds: float) -> bool:
        return self.progress(step, seconds) >= 1.0


@dataclass
class TeacherArgs:
    """Where the teacher comes from; the spec flags are for weights that carry no spec."""

    path: str = ""
    arch: str | None = None
    input_shape: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    num_classes: int | None = None

    def load(self):
        from dfkd.models.classifier import load_classifier

        return load_classifier(self.path, arch=self.arch,
                               input_shape=tuple(self.input_shape) if self.input_shape else None,
                               mean=tuple(self.mean) if self.mean else None,
                               std=tuple(self.std) if self.std else None,
                               num_classes=self.num_classes)


@dataclass
class DistillConfig:
    """Everything `dfkd distill` needs; config.yaml is this dataclass."""

    teacher: TeacherArgs = field(default_factory=TeacherArgs)
    method: str = "deepinv"
    method_options: dict = field(default_factory=dict)
    student: str = ""  # zoo name or package.module:factory; "" = the usual student of a zoo
    # teacher (lenet5 -> lenet5_half, digits_cnn -> digits_cnn_quarter, resnet34 -> resnet18, ...)
    student_init: str = "auto"  # teacher (leading slices of the teacher's tensors, for a student
    # that is a slimmer or shallower copy of it; dfkd/student/start.py) | random | auto (teacher
    # where the student is such a copy, else random)
    out: str = "runs/distill"
    budget: str = "5m"
    seed: int = 0
    device: str = "auto"
    eval_dataset: str | None = None  # None: the teacher's training dataset if known; "none": off
    data_root: str | None = None
    eval_points: int = 10  # evaluations spread evenly over the budget (reporting only)
    transfer_set: str | None = None  # train on a saved set instead of synthesizing
    temperature: float | None = None  # None: the method's default
    loss: str = ""  # student loss: kd | l1 | at | fa | crd; "" = the method's default (kd for
    # most, l1 for DFAD, at for ZSKT)
    loss_options: dict = field(default_factory=dict)  # the loss's options, e.g. {"weight": 100}
    update: str = "plain"  # student update of online methods: plain | lra (student_update.py)
    update_options: dict = field(default_factory=dict)  # e.g. {"memory": 10}
    batch_size: int = 256  # student minibatch
    optimizer: str = "sgd"  # sgd (Nesterov momentum 0.9) | adam (AdamW)
    lr: float | None = None  # None: 0.1 for sgd, 1e-3 for adam; cosine decay over the budget
    weight_decay: float = 5e-4
    augment: str = "shift+mix"  # none | shift | shift+flip | affine | affine+flip, each with an
    # optional +mix, on stored samples, relabelled by the teacher each step (a forward pass, far
    # cheaper than a new sample)
    schedule: str = "planned"  # transfer-set methods: planned (dfkd.engine.plan divides the
    # budget by measured costs) | fixed (the method's own rounds, FIXED_STEPS_PER_ROUND student
    # steps apart)
    steps_per_round: int | None = None  # student steps between synthesis rounds; None: the
    # schedule's
    checkpoint_seconds: float = 30.0  # at most this much work is redone after a kill
    # how the teacher runs (dfkd.accel): bf16 autocast, channels_last, torch.compile. They speed
    # up a GPU; on the 2-core CPU here none pays for LeNet-5 (docs/teachers.md, "Devices")
    precision: str = "fp32"  # fp32 | bf16 (autocast of synthesis and the teacher's relabelling)
    channels_last: bool = False
    compile: bool = False


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass; unknown keys are an error, not silently ignored."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise DfkdError(f"unknown config keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for k, v in data.items():
        default = names[k].default_factory if names[k].default_factory is not dataclasses.MISSING \
            else None
        if default is not None and dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = from_dict(default, v)
        kwargs[k] = v
    return cls(**kwargs)


def load_config(cls, path: Path):
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DfkdError(f"cannot read config '{path}': {str(e).splitlines()[0]}") from None
    return from_dict(cls, data)


def prepare_run_dir(out: Path, cfg, resume: bool, command: str) -> None:
    """Refuse to mix runs: an existing run needs --resume and the same configuration."""
    config_path = out / "config.yaml"
    if config_path.exists():
        if not resume:
            raise DfkdError(f"'{out}' already holds a run; add --resume to continue it or choose "
                            "another --out")
        old = load_config(type(cfg), config_path)
        if to_dict(old) != to_dict(cfg):
            diff = sorted(k for k, v in to_dict(cfg).items() if to_dict(old).get(k) != v)
            raise DfkdError(f"--resume with a different configuration ({', '.join(diff)} changed);"
                            f" rerun with the settings in {config_path}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_path)
        write_text(out / "command.txt", command + "\n")
