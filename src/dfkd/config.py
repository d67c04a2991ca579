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
# where an augmented batch's targets come from: the teacher on the batch, or the stored ones
RELABELS = ("teacher", "stored")

# how a teacher may run (dfkd.accel.Accel), here for the same reason as AUGMENTATIONS
PRECISIONS = ("fp32", "bf16")

# how a transfer-set run is scheduled (dfkd.engine.plan), and the fixed schedule's student
# steps per round
SCHEDULES = ("planned", "proportional", "fixed")
FIXED_STEPS_PER_ROUND = 200
SYNTHESIS_SHARE = 0.5  # of a planned run's budget, for synthesis, unless the run sets its own


def synthesis_share(value) -> float:
    """`value` as a share of the budget for synthesis, or the one-line error that says why not."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = None
    if share is None or not 0 < share < 1:
        raise DfkdError(f"the synthesis share must be a number between 0 and 1, not '{value}': "
                        "it is the share of the budget spent synthesizing")
    return share


def on_off(value) -> bool:
    """'true'/'false' (also 1/0, on/off, yes/no) as a bool, or the one-line error."""
    text = str(value).strip().lower()
    if text in ("true", "1", "on", "yes"):
        return True
    if text in ("false", "0", "off", "no"):
        return False
    raise DfkdError(f"expected true or false, not '{value}'")


# where the student's weights start (dfkd.student.start), and how an online method's batch
# moves them (dfkd.student.update), here for the same reason
STUDENT_INITS = ("auto", "random", "teacher")
UPDATES = ("plain", "lra")
DEFENSES = ("none", "abd", "nc")  # backdoor defences of the student (dfkd.student.defense)



def option(default=dataclasses.MISSING, help: str = "", *, factory=None, choices=None,
           metavar: str | None = None, flag: str | None = None):
    """A config field that is also a command-line flag, named once: the CLI
    (`cli.add_options`) makes `--field-name` (or `flag`) from it, typed by the field's annotation,
    with this help, choices and metavar. A field declared without it is no flag (config files
    may still set it)."""
    meta = {"cli": {"help": help, "choices": choices, "metavar": metavar, "flag": flag}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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


def is_api_url(path: str) -> bool:
    return str(path).startswith(("http://", "https://"))


@dataclass
class TeacherArgs:
    """Where the teacher comes from; the spec flags are for weights that carry no spec. A config
    field of this type is a command-line flag for the path (`--teacher`, `--model`) plus these."""

    path: str = ""
    arch: str | None = option(None, "architecture: a zoo name or package.module:factory (needed "
                              "when the weights do not say)")
    input_shape: list[int] | None = option(None, "input shape, for weights that carry no spec")
    mean: list[float] | None = option(None, "normalization mean (one or per channel)")
    std: list[float] | None = option(None, "normalization std (one or per channel)")
    num_classes: int | None = option(None, "number of classes (else inferred)")

    @property
    def is_api(self) -> bool:
        """A black-box teacher's URL (or several, comma-separated) rather than weights."""
        return is_api_url(self.path)

    def load(self):
        if self.is_api:
            from dfkd.blackbox.teacher import connect

            return connect(self.path)
        from dfkd.models.classifier import load_classifier

        return load_classifier(self.path, arch=self.arch,
                               input_shape=tuple(self.input_shape) if self.input_shape else None,
                               mean=tuple(self.mean) if self.mean else None,
                               std=tuple(self.std) if self.std else None,
                               num_classes=self.num_classes)


SOURCE = "run directory, .safetensors or state-dict file"
TEACHER_SOURCE = f"{SOURCE}, or a black-box API's URL (http://HOST:PORT, e.g. `dfkd serve`)"


@dataclass
class DistillConfig:
    """Everything `dfkd distill` needs; config.yaml is this dataclass."""

    teacher: TeacherArgs = option(factory=TeacherArgs, help=f"teacher: {TEACHER_SOURCE}")
    method: str = option("auto", "synthesis method (see `dfkd methods`); auto: chosen from the "
                         "teacher by its inversion cost (dfkd.engine.method_choice)")
    method_options: dict = option(factory=dict, flag="--set", help="a method option, e.g. "
                                  "--set steps=500 (repeatable)")
    student: str = option("", "zoo name or package.module:factory (default: the usual student "
                          "of a zoo teacher, e.g. lenet5 -> lenet5_half, resnet34 -> resnet18)")
    student_init: str = option("auto", "teacher: start from the leading slices of the teacher's "
                               "weights (a student that is a slimmer or shallower copy of it), "
                               "random: the architecture's own initialization, or auto "
                               "(default): teacher where the student is such a copy, else random",
                               choices=STUDENT_INITS)
    out: str = option("runs/distill", "run directory")
    budget: str = option("5m", "wall clock (90s, 10m, 1h) or steps (2000steps)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    eval_dataset: str | None = option(None, "report-only evaluation data; 'none' for none "
                                      "(default: the teacher's training dataset if recorded)")
    data_root: str | None = option(None, "where the evaluation dataset's files are")
    eval_points: int = option(10, "evaluations spread evenly over the budget (reporting only)")
    eval_trigger: str = option("", "evaluation only: a backdoor trigger (dfkd.backdoor, e.g. "
                               "badnets:target=0) whose attack success rate on the evaluation "
                               "data is reported for teacher and student; nothing trains on it",
                               metavar="SPEC")
    query_budget: int = option(0, "black-box teachers: images the run may send to the API (0: "
                               "no limit); the run ends where it stands when the next request "
                               "would pass it, and --resume replays paid answers from the run's "
                               "queries/ for free", metavar="N")
    transfer_set: str | None = option(None, "train on a set from `dfkd synthesize` instead of "
                                      "synthesizing")
    temperature: float | None = option(None, "KD temperature (default: the method's)")
    loss: str = option("", "the student's loss (default: the method's own, kd for most): kd, "
                       "l1 on logits, at (KD + attention transfer), fa (KD + feature affinity), "
                       "crd (KD + contrastive representation distillation; transfer-set methods "
                       "only)", metavar="{kd,l1,at,fa,crd}")
    loss_options: dict = option(factory=dict, flag="--loss-set", help="a student-loss option, "
                                "e.g. --loss-set weight=100 (repeatable)")
    update: str = option("plain", "student update of an online method: plain optimizer step "
                         "(default) or lra (meta step on the new batch + replay memory of past "
                         "ones)", choices=UPDATES)
    update_options: dict = option(factory=dict, flag="--update-set", help="a student-update "
                                  "option, e.g. --update-set memory=20 (repeatable)")
    defense: str = option("none", "a backdoor defence for the student: abd (Hong et al. 2023: "
                          "shuffling vaccine and self-retrospection) or nc (trigger reversal "
                          "and unlearning, after Neural Cleanse); the student then starts "
                          "random, never from the teacher's weights", choices=DEFENSES)
    defense_options: dict = option(factory=dict, flag="--defense-set", help="a defence option, "
                                   "e.g. --defense-set sv_weight=0.2 (repeatable)")
    batch_size: int = option(256, "student minibatch")
    optimizer: str = option("sgd", "the student's optimizer: sgd (Nesterov momentum 0.9) or "
                            "adam (AdamW)", choices=("sgd", "adam"))
    lr: float | None = option(None, "the student's learning rate (default 0.1 for sgd, 1e-3 for "
                              "adam), cosine-decayed over the budget")
    weight_decay: float = 5e-4
    augment: str = option("shift+mix", "augment stored samples and relabel them by the teacher "
                          "at each step (a forward pass, far cheaper than a new sample): shift, "
                          "then blend random pairs (+mix); affine adds rotation and scale",
                          choices=AUGMENTATIONS)
    relabel: str = option("teacher", "the targets of augmented batches: teacher (the teacher "
                          "labels each batch as augmented) or stored (the samples' stored "
                          "targets, blended with their pairs for +mix: no teacher pass per "
                          "student step)", choices=RELABELS)
    schedule: str = option("planned", "transfer-set methods: planned (samples per round, "
                           "inversion steps and student steps between rounds planned from "
                           "measured costs for the budget; the student's steps split evenly "
                           "between rounds), proportional (planned, the student's steps between "
                           "rounds in proportion to the set's size) or fixed (the method's own "
                           f"rounds, {FIXED_STEPS_PER_ROUND} student steps apart)",
                           choices=SCHEDULES)
    synthesis_share: float = option(SYNTHESIS_SHARE, "planned schedules: the share of the "
                                    "budget spent synthesizing, the rest training the student")
    steps_per_round: int | None = option(None, "student steps between synthesis rounds "
                                         "(default: the schedule's)")
    checkpoint_seconds: float = 30.0  # at most this much work is redone after a kill
    # how the teacher (and, compiled, the student's steps) run (dfkd.accel). bf16 and
    # channels_last are for a GPU; compile pays on this CPU too, for a ResNet-sized teacher
    # (docs/teachers.md, "Devices")
    precision: str = option("fp32", "bf16: synthesis and the teacher's relabelling under "
                            "autocast (GPU)", choices=PRECISIONS)
    channels_last: bool = option(False, "run the teacher in channels_last memory format (GPU)")
    compile: bool | None = option(None, "run the teacher and the student's training steps "
                                  "through torch.compile (--no-compile: never); unset, where "
                                  "the teacher's inversion step costs more than 50 MFLOPs per "
                                  "image and the device has a compiler")


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


def _comparable(config: dict) -> dict:
    """A config as resuming compares it: a teacher API may come back at another address (the
    query log checks that it answers as before)."""
    teacher = config.get("teacher")
    if isinstance(teacher, dict) and is_api_url(teacher.get("path", "")):
        config = {**config, "teacher": {**teacher, "path": "a black-box API"}}
    return config


def prepare_run_dir(out: Path, cfg, resume: bool, command: str) -> None:
    """Refuse to mix runs: an existing run needs --resume and the same configuration."""
    config_path = out / "config.yaml"
    if config_path.exists():
        if not resume:
            raise DfkdError(f"'{out}' already holds a run; add --resume to continue it or choose "
                            "another --out")
        old, new = _comparable(to_dict(load_config(type(cfg), config_path))), _comparable(
            to_dict(cfg))
        if old != new:
            diff = sorted(k for k, v in new.items() if old.get(k) != v)
            raise DfkdError(f"--resume with a different configuration ({', '.join(diff)} changed);"
                            f" rerun with the settings in {config_path}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_path)
        write_text(out / "command.txt", command + "\n")
