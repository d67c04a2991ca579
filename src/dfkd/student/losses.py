"""The student's loss, chosen by name for any method (`dfkd distill --loss NAME`).

Each method names its own default (`Synthesizer.student_loss`: KD for most, L1 for DFAD, AT for
ZSKT); `--loss` replaces it, `--loss-set KEY=VALUE` sets the loss's options (defaults below, the
paper's value beside each). The losses that read intermediate features find matching layers in
any pair of `nn.Module`s by themselves and hook them by module path:

- `kd`: tau^2 KL(p_T || p_S) at the run's temperature (Hinton et al.).
- `l1`: mean |z_T - z_S| on the logits (DFAD); no temperature.
- `at`: KD + 250 * attention transfer (ZSKT; Zagoruyko & Komodakis) summed over matched layers.
- `fa`: KD + weight * feature affinity (FAQD): the batch's n x n cosine-similarity matrices of
  matched layers, exact by default, or the fast sketch estimate (`mode=fast`, see losses.py).
- `crd`: KD + 0.8 * contrastive representation distillation (Tian et al., ICLR 2020): trainable
  128-d heads on the inputs of both classifier heads, NCE against a memory of one embedding per
  transfer-set sample. Transfer-set methods (and `--transfer-set`) only: the memory is indexed
  by the set's sample indices, which an online method's fresh batches do not have.
- `ce`: cross-entropy on true labels: the `scratch_real` anchor's loss, no teacher.

Matched layers (`at`, `fa`): for each spatial resolution of a forward pass, the last module with
a 4-D output of that size (a ResNet's residual groups, a plain CNN's last op before each
pooling); modules called more than once are skipped, as their hooked value is ambiguous, and so
are 1x1 maps (global pooling). Teacher
and student stages are paired from the deepest, as many as the shallower model has; attention
maps of different sizes are resized to the teacher's. `layers=T1:S1,T2:S2` names them instead.

Teacher features come from a teacher forward on the student's exact batch: the relabelling pass
of transfer-set training when there is one, an extra pass otherwise (counted in teacher_passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError, require_one_of
from dfkd.hooks import Tap, dummy_forward, get_module, head_path, matched_layers, stage_outputs
from dfkd.losses import (
    attention_transfer_loss,
    fast_feature_affinity_loss,
    feature_affinity_loss,
    kd_loss,
    logit_l1_loss,
    nce_loss,
)
from dfkd.models.classifier import Classifier
from dfkd.options import build_options


@dataclass
class NoOptions:
    """KD, L1 and CE have no options of their own (KD's temperature is the run's)."""


class StudentLoss(nn.Module):
    """One student loss: options, the layers it taps, and any trainable part (CRD's heads and
    memory live in its state_dict, which the engine checkpoints beside the student)."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = False  # reads teacher features on the student's batch
    needs_index: ClassVar[bool] = False  # reads the batch's transfer-set indices
    by_stage: ClassVar[bool] = False  # pairs 4-D feature maps stage by stage

    def __init__(self, opts, temperature: float, teacher: Classifier, student: Classifier):
        super().__init__()
        self.opts, self.temperature = opts, temperature
        self.layers: list[tuple[str, str]] = []
        self.captured = "output"  # of the tapped modules, or their input (CRD's head inputs)
        self.taps: dict[str, list[Tap]] = {"teacher": [], "student": []}

    def tap(self, teacher: Classifier, student: Classifier, pairs: list[tuple[str, str]],
            capture: str = "output") -> None:
        self.layers = pairs
        self.captured = capture
        self.taps["teacher"] += [Tap(get_module(teacher.net, t), capture=capture) for t, _ in pairs]
        self.taps["student"] += [Tap(get_module(student.net, s), capture=capture) for _, s in pairs]

    def probe(self, teacher: Classifier, student: Classifier) -> dict[str, list[torch.Size]]:
        """Shapes of the tapped values on a dummy batch of two, per side."""
        shapes = {}
        for side, model in (("teacher", teacher), ("student", student)):
            with self.capture(side):
                dummy_forward(model.net, model.spec.shape, model.mean.device)
            shapes[side] = [v.shape for v in self.take(side)]
        return shapes

    @contextlib.contextmanager
    def capture(self, side: str):
        """Record the tapped layers of `side` ("teacher" or "student") during the block."""
        for t in self.taps[side]:
            t.on = True
        try:
            yield
        finally:
            for t in self.taps[side]:
                t.on = False

    def take(self, side: str) -> list[torch.Tensor]:
        """The values recorded for `side`, released from the taps (no graph kept past a step)."""
        values = [t.value for t in self.taps[side]]
        if any(v is None for v in values):
            raise DfkdError(f"student loss '{self.name}' got no {side} features: run the "
                            f"{side} inside capture('{side}')")
        for t in self.taps[side]:
            t.value = None
        return values

    def kd(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, teacher_logits, self.temperature)

    def forward(self, logits: torch.Tensor, teacher_logits: torch.Tensor | None, batch: dict, *,
                set_size: int = 0, gen: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def report(self) -> dict:
        out = {"student_loss": self.name, "student_loss_options": dataclasses.asdict(self.opts)}
        if self.layers:
            at = " (input)" if self.captured == "input" else ""
            out["student_loss_layers"] = [f"{t}{at} -> {s}{at}" for t, s in self.layers]
        return out

    def remove(self) -> None:
        for t in self.taps["teacher"] + self.taps["student"]:
            t.remove()


class KD(StudentLoss):
    name = "kd"

    def forward(self, logits, teacher_logits, batch, *, set_size=0, gen=None):
        return self.kd(logits, teacher_logits)


class L1(StudentLoss):
    name = "l1"

    def forward(self, logits, teacher_logits, batch, *, set_size=0, gen=None):
        return logit_l1_loss(logits, teacher_logits)


class CE(StudentLoss):
    name = "ce"

    def forward(self, logits, teacher_logits, batch, *, set_size=0, gen=None):
        if "labels" not in batch:
            raise DfkdError("student loss 'ce' needs true labels, which only the scratch_real "
                            "anchor's batches carry; choose kd, l1, at, fa or crd")
        return F.cross_entropy(logits, batch["labels"].to(logits.device))


@dataclass
class ATOptions:
    weight: float = 250.0  # beta in KD + beta * AT (ZSKT: 250)
    layers: str = ""  # "" = matched by stage; or TEACHER_PATH:STUDENT_PATH,...


class AT(StudentLoss):
    name = "at"
    by_stage = True
    Options = ATOptions
    needs_teacher = True

    def __init__(self, opts, temperature, teacher, student):
        super().__init__(opts, temperature, teacher, student)
        _check(opts.weight >= 0, f"at weight must be >= 0, got {opts.weight}")
        self.tap(teacher, student, matched_layers(teacher, student, opts.layers, self.name))
        for side, shapes in self.probe(teacher, student).items():
            for (t, s), shape in zip(self.layers, shapes, strict=True):
                _check(len(shape) == 4, f"at compares 4-D feature maps, but {side} layer "
                       f"'{t if side == 'teacher' else s}' gives shape {tuple(shape)}; name "
                       "other layers")

    def forward(self, logits, teacher_logits, batch, *, set_size=0, gen=None):
        at = sum(attention_transfer_loss(s, t)
                 for s, t in zip(self.take("student"), self.take("teacher"), strict=True))
        return self.kd(logits, teacher_logits) + self.opts.weight * at


@dataclass
class FAOptions:
    weight: float = 10.0  # lambda in KD + lambda * FA (FAQD's value unverified; 10: measured
    # on digits, docs/distill.md)
    layers: str = ""  # "" = matched by stage; or TEACHER_PATH:STUDENT_PATH,...
    mode: str = "exact"  # exact: the n x n matrices (cheap at batch 256) | fast: sketch estimate
    probes: int = 32  # Gaussian probes of the fast estimate (its variance falls as 1/probes)


class FA(StudentLoss):
    name = "fa"
    by_stage = True
    Options = FAOptions
    needs_teacher = True

    def __init__(self, opts, temperature, teacher, student):
        super().__init__(opts, temperature, teacher, student)
        _check(opts.weight >= 0, f"fa weight must be >= 0, got {opts.weight}")
        _check(opts.mode in ("exact", "fast"), f"fa mode must be exact or fast, got '{opts.mode}'")
        _check(opts.probes > 0, f"fa probes must be positive, got {opts.probes}")
        self.tap(teacher, student, matched_layers(teacher, student, opts.layers, self.name))

    def forward(self, logits, teacher_logits, batch, *, set_size=0, gen=None):
        pairs = zip(self.take("student"), self.take("teacher"), strict=True)
        if self.opts.mode == "exact":
            fa = sum(feature_affinity_loss(s, t) for s, t in pairs)
        else:
            n = logits.shape[0]
            fa = sum(fast_feature_affinity_loss(
                s, t, torch.randn(n, self.opts.probes, generator=gen).to(s.device))
                for s, t in pairs)
        return self.kd(logits, teacher_logits) + self.opts.weight * fa


@dataclass
class CRDOptions:
    weight: float = 0.8  # beta in KD + beta * CRD (paper: 0.8)
    dim: int = 128  # embedding size of both heads (paper: 128)
    negatives: int = 16384  # K noise samples per anchor (paper: 16384), at most the set's size
    nce_temperature: float = 0.07  # of the embedding similarities (paper: 0.07)
    momentum: float = 0.5  # of the memory update (paper: 0.5)
    layers: str = ""  # "" = the inputs of both classifier heads (penultimate features); or
    # TEACHER_PATH:STUDENT_PATH, whose outputs are embedded


class ContrastMemory(nn.Module):
    """One L2-normalized embedding per transfer-set sample for one side (teacher or student),
    moved toward the sample's newest embedding by momentum whenever the sample is drawn.

    The memory grows with the transfer set (new rows: random unit vectors). Probabilities are
    exp(v . m / T) / Z with Z = N times the mean exp-score of the first batch (CRD estimates Z
    once; scaling it by the current size N keeps it a normalizer as the set grows).
    """

    def __init__(self, dim: int, temperature: float, momentum: float):
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        self.register_buffer("bank", torch.zeros(0, dim))
        self.register_buffer("z", torch.tensor(-1.0))  # < 0 until the first batch sets it

    def grow(self, n: int, gen: torch.Generator) -> None:
        extra = n - self.bank.shape[0]
        if extra > 0:
            rows = F.normalize(torch.randn(extra, self.bank.shape[1], generator=gen), dim=1)
            self.bank = torch.cat([self.bank, rows.to(self.bank.device)])

    def probs(self, v: torch.Tensor, index: torch.Tensor,
              negatives: torch.Tensor) -> torch.Tensor:
        """(n, 1 + K): column 0 each anchor's own row, then its K noise rows. Scored against the
        whole memory in one product, then gathered: n x N floats instead of n x (1+K) x dim."""
        scores = torch.exp(v @ self.bank.t() / self.temperature)
        picked = scores.gather(1, torch.cat([index[:, None], negatives], 1))
        if self.z < 0:
            self.z.fill_(picked.detach().mean())
        return picked / (self.z * self.bank.shape[0])

    @torch.no_grad()
    def update(self, v: torch.Tensor, index: torch.Tensor) -> None:
        rows = self.bank[index] * self.momentum + v.detach().float() * (1 - self.momentum)
        # out of place: the old bank is saved for the backward pass of probs()
        self.bank = self.bank.index_copy(0, index, F.normalize(rows, dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "bank"
        if key in state_dict:  # the checkpointed memory may be larger than this fresh one
            self.bank = torch.zeros_like(state_dict[key], device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CRD(StudentLoss):
    name = "crd"
    Options = CRDOptions
    needs_teacher = True
    needs_index = True

    def __init__(self, opts, temperature, teacher, student):
        super().__init__(opts, temperature, teacher, student)
        _check(opts.weight >= 0, f"crd weight must be >= 0, got {opts.weight}")
        _check(opts.dim > 0 and opts.negatives > 0,
               f"crd dim and negatives must be positive, got {opts.dim}, {opts.negatives}")
        _check(opts.nce_temperature > 0, f"crd nce_temperature must be > 0, got "
               f"{opts.nce_temperature}")
        _check(0 <= opts.momentum < 1, f"crd momentum must be in [0, 1), got {opts.momentum}")
        if opts.layers:
            self.tap(teacher, student, matched_layers(teacher, student, opts.layers, self.name))
        else:
            pair = (_head(teacher, "teacher"), _head(student, "student"))
            self.tap(teacher, student, [pair], capture="input")
        dims = {side: shapes[0][1:].numel()
                for side, shapes in self.probe(teacher, student).items()}
        self.embed_s = nn.Linear(dims["student"], opts.dim).to(student.mean.device)
        self.embed_t = nn.Linear(dims["teacher"], opts.dim).to(student.mean.device)
        self.memory_s = ContrastMemory(opts.dim, opts.nce_temperature, opts.momentum)
        self.memory_t = ContrastMemory(opts.dim, opts.nce_temperature, opts.momentum)
        self.to(student.mean.device)

    def forward(self, logits, teacher_logits, batch, *, set_size=0, gen=None):
        if batch.get("index") is None or set_size <= 0:
            raise DfkdError("student loss 'crd' needs transfer-set indices with its batches")
        (fs,), (ft,) = self.take("student"), self.take("teacher")
        index = batch["index"].to(logits.device)
        for memory in (self.memory_s, self.memory_t):
            memory.grow(set_size, gen)
        k = min(self.opts.negatives, set_size)
        negatives = torch.randint(set_size, (len(index), k), generator=gen).to(logits.device)
        vs = F.normalize(self.embed_s(fs.flatten(1).float()), dim=1)
        vt = F.normalize(self.embed_t(ft.flatten(1).float()), dim=1)
        # student embeddings against the teacher memory, and the teacher's against the student's
        crd = (nce_loss(self.memory_t.probs(vs, index, negatives), 1.0 / set_size)
               + nce_loss(self.memory_s.probs(vt, index, negatives), 1.0 / set_size))
        self.memory_s.update(vs, index)
        self.memory_t.update(vt, index)
        return self.kd(logits, teacher_logits) + self.opts.weight * crd

    def report(self) -> dict:
        return {**super().report(), "crd_memory": self.memory_s.bank.shape[0]}


def _head(model: Classifier, role: str) -> str:
    return head_path(model.net, "name the layers with --loss-set layers=TEACHER_PATH:STUDENT_PATH"
                     f" (student loss 'crd' embeds the input of the {role}'s classifier head)")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DfkdError(message)


LOSSES: dict[str, type[StudentLoss]] = {c.name: c for c in (KD, L1, AT, FA, CRD, CE)}
CHOICES = ("kd", "l1", "at", "fa", "crd")  # offered by --loss; ce is the scratch_real anchor's


def method_loss(name: str, method: str, teacher: Classifier,
                student: Classifier) -> tuple[str, str]:
    """The method's own student loss, or kd where that loss pairs feature maps the models lack
    (zskt's attention transfer on an MLP), so that the method still runs on any classifier;
    the second item says why kd, or is empty."""
    if LOSSES[name].by_stage:
        for role, model in (("teacher", teacher), ("student", student)):
            if not stage_outputs(model):
                return "kd", (f"method '{method}' pairs its student loss '{name}' with 4-D "
                              f"feature maps, and the {role} ({model.arch}) has none: the "
                              "student learns by kd alone")
    return name, ""


def create_student_loss(name: str, options: dict, *, teacher: Classifier, student: Classifier,
                        temperature: float, method: str, family: str) -> StudentLoss:
    """The loss `name` with `options` (KEY -> value or string), checked against the method."""
    if name not in LOSSES:  # ce exists for the scratch_real anchor but is not offered
        require_one_of("student loss", name, CHOICES)
    cls = LOSSES[name]
    if cls.needs_index and family == "online":
        raise DfkdError(f"student loss '{name}' needs a fixed transfer set to index its memory, "
                        f"but method '{method}' is online (a fresh batch every step); use a "
                        "transfer-set method such as deepinv or mvn, or --transfer-set DIR")
    opts = build_options(cls.Options, options, f"student loss '{name}'")
    return cls(opts, temperature, teacher, student)
