"""The Synthesizer interface every method implements, and its registry.

Two families share it. A *transfer-set* synthesizer returns one round of finished samples that
the engine stores and the student revisits; an *online* synthesizer returns a fresh batch for
every student step (and may train a generator inside `synthesize`). Either way a batch is a dict:
`x` pixels in [0,1], `logits` the teacher's logits on exactly those pixels, `targets` the class
the sample was made for (-1 if none), `seeds` what makes the sample reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch

from dfkd.errors import DfkdError, require_one_of
from dfkd.models.classifier import Classifier
from dfkd.options import build_options

Batch = dict[str, torch.Tensor]
_METHODS: dict[str, type[Synthesizer]] = {}


@dataclasses.dataclass
class Options:
    """Base of every method's options; fields are the defaults, documented next to them."""


class Synthesizer:
    name: ClassVar[str]
    family: ClassVar[str]  # "transfer_set" or "online"
    Options: ClassVar[type] = Options
    temperature: ClassVar[float] = 4.0  # KD temperature the method's student uses by default
    student_loss: ClassVar[str] = "kd"  # the student's loss by default (e.g. l1 for DFAD)
    uses_real_data: ClassVar[bool] = False  # True only for the benchmark anchors
    targets_are_teacher_logits: ClassVar[bool] = True  # a batch's target_logits are the
    # teacher's outputs on its x, so the engine may relabel augmented copies by the teacher;
    # False for soft targets made otherwise (DB3KD's, from decision-boundary distances)
    student_sees_teacher: ClassVar[bool] = True  # False: the student may not start from the
    # teacher's weights either (scratch_real, the no-teacher anchor, ignores --student-init)
    black_box: ClassVar[tuple[str, ...]] = ()  # the API access levels (dfkd.blackbox.wire) it
    # can distill from: a method that needs only the teacher's answers, never its gradients,
    # layers or weights
    round_options: ClassVar[tuple[str, str]] = ("batch_size", "steps")  # a transfer-set round's
    # samples and optimization steps: the options the engine's planner (dfkd.engine.plan) may set

    def __init__(self, teacher: Classifier, options, seed: int):
        self.teacher, self.opts, self.seed = teacher, options, seed
        self.teacher_passes = 0  # images through the teacher (forward, with or without backward)

    clock: Clock | None = None  # the run's wall-clock budget, when it has one (the engine's)

    def should_stop(self) -> bool:
        """True once the run's wall-clock budget is spent: long inner loops check it every step,
        so that no method can overrun its budget."""
        return self.clock is not None and self.clock.used() >= 1.0

    def budget_used(self) -> float:
        """The share of the run's wall-clock budget spent so far, in [0, 1] (0 without a
        wall-clock budget), for methods that split the budget into stages."""
        return self.clock.used() if self.clock is not None else 0.0

    @property
    def device(self) -> torch.device:
        return self.teacher.mean.device

    def synthesize(self, student: Classifier, index: int) -> Batch:
        """Batch number `index` (rounds for transfer-set methods, steps for online ones)."""
        raise NotImplementedError

    @torch.no_grad()
    def label(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits on x (eval mode): the soft targets stored beside the inputs."""
        self.teacher_passes += x.shape[0]
        return self.teacher(x).float()

    def rng(self, index: int) -> torch.Generator:
        """A per-batch RNG derived from (seed, index): batches are reproducible on their own."""
        return torch.Generator(self.device).manual_seed(self.batch_seed(index))

    def noise_start(self, index: int, batch_size: int, lr: float):
        """How a pixel-inversion round begins: batch `index`'s RNG, classes balanced over the
        batch, Gaussian inputs in the normalized space, and their Adam optimizer."""
        gen = self.rng(index)
        y = balanced_targets(batch_size, self.teacher.spec.num_classes, gen)
        z = torch.randn((batch_size, *self.teacher.spec.shape), generator=gen, device=self.device)
        z.requires_grad_(True)
        return gen, y, z, torch.optim.Adam([z], lr=lr, betas=(0.5, 0.99))

    def in_pixel_range(self, x: torch.Tensor) -> torch.Tensor:
        """x (normalized space) clamped to the [0, 1] pixel range in the forward pass, the
        gradient passed straight through: a generator's objective then sees what is stored, and
        pixels beyond the range can still be pulled back."""
        lo = self.teacher.normalize(torch.zeros(1, device=x.device))
        hi = self.teacher.normalize(torch.ones(1, device=x.device))
        return x + (torch.maximum(torch.minimum(x, hi), lo) - x).detach()

    def clamp_to_image_(self, z: torch.Tensor) -> None:
        """Keep inputs optimized in normalized space inside the [0, 1] pixel range (in place,
        after every optimizer step)."""
        lo = self.teacher.normalize(torch.zeros(1, device=z.device))
        hi = self.teacher.normalize(torch.ones(1, device=z.device))
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, hi), lo))

    def invert(self, z: torch.Tensor, opt: torch.optim.Optimizer, steps: int, step_loss,
               passes: int) -> None:
        """The inversion loop the pixel-space methods share: up to `steps` optimizer steps on
        `step_loss()` (the method's loss, computed afresh from z), z kept in the pixel range
        and `passes` teacher passes counted after each; it stops once the budget is spent."""
        for _ in range(steps):
            if self.should_stop():
                break
            opt.zero_grad(set_to_none=True)
            step_loss().backward()
            opt.step()
            self.clamp_to_image_(z)
            self.teacher_passes += passes

    def inverted_batch(self, index: int, z: torch.Tensor, targets: torch.Tensor) -> Batch:
        """Round `index` of a pixel-space method as stored: z as pixels, the teacher's logits
        on exactly those pixels, the intended classes and the round's seeds."""
        x = self.stored_pixels(z)
        return {"x": x, "target_logits": self.label(x), "classes": targets,
                "seeds": self.seeds(index, len(x))}

    def stored_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Optimized inputs as [0, 1] pixels at the transfer set's float16 precision, so the
        stored logits are the teacher's on exactly what is stored."""
        return self.teacher.denormalize(z.detach()).clamp(0, 1).half().float()

    def batch_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + index) % (2**63)

    def seeds(self, index: int, n: int) -> torch.Tensor:
        """The `seeds` column of batch `index`: what reproduces each of its n samples."""
        return torch.full((n,), self.batch_seed(index), dtype=torch.long)

    def sample_limit(self) -> int | None:
        """Size at which a transfer-set method stops synthesizing and the student trains on the
        finished set: `samples_per_class` times the classes for methods with that option (0 or
        absent: the set grows for the whole budget)."""
        per_class = getattr(self.opts, "samples_per_class", 0)
        if per_class < 0:
            raise DfkdError(f"samples_per_class must be >= 0 (0: no cap), got {per_class}")
        return per_class * self.teacher.spec.num_classes if per_class > 0 else None

    def report(self) -> dict:
        """Method-specific keys for report.json (e.g. label_mismatch)."""
        return {}

    def state_dict(self) -> dict:
        return {"teacher_passes": self.teacher_passes}

    def load_state_dict(self, state: dict) -> None:
        self.teacher_passes = int(state["teacher_passes"])


class Clock:
    """What a synthesizer asks of the run's wall-clock budget: `spent()` returns the seconds of
    budget spent so far, the running synthesis call included."""

    def __init__(self, budget_seconds: float, spent):
        self.budget_seconds, self.spent = budget_seconds, spent

    def used(self) -> float:
        return min(1.0, self.spent() / self.budget_seconds)


class CountsLabelMismatch:
    """Mixin for methods that draw soft targets for intended classes: counts how often the
    target's argmax is another class (`label_mismatch` in the report, resumable)."""

    drawn = 0
    mismatched = 0

    def count_mismatch(self, target: torch.Tensor, classes: torch.Tensor) -> None:
        self.drawn += len(classes)
        self.mismatched += int((target.argmax(1) != classes).sum())

    def report(self) -> dict:
        return {"label_mismatch": self.mismatched / self.drawn if self.drawn else None}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "drawn": self.drawn, "mismatched": self.mismatched}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.drawn, self.mismatched = int(state["drawn"]), int(state["mismatched"])


def register_method(cls: type[Synthesizer]) -> type[Synthesizer]:
    _METHODS[cls.name] = cls
    return cls


def list_methods(anchors: bool = False) -> dict[str, str]:
    """Name -> one-line description (the first docstring line) of the data-free methods; with
    `anchors`, also the benchmark anchors that train on real data."""
    return {n: (c.__doc__ or "").strip().splitlines()[0] for n, c in sorted(_METHODS.items())
            if anchors or not c.uses_real_data}


def methods_markdown(auto_rule: str) -> str:
    """The README's table of methods, built from the registry: `auto`, the default, by its rule,
    then every method and anchor."""
    rows = ["| method | family | what it does |", "|---|---|---|",
            f"| `auto` (default) | chosen from the teacher | {auto_rule} |"]
    for name, doc in list_methods(anchors=True).items():
        cls = _METHODS[name]
        family = "anchor (real data)" if cls.uses_real_data else cls.family.replace("_", " ")
        rows.append(f"| `{name}` | {family} | {doc} |")
    return "\n".join(rows) + "\n"


def method_class(name: str) -> type[Synthesizer]:
    require_one_of("method", name, sorted(_METHODS))
    return _METHODS[name]


def parse_options(cls: type[Synthesizer], given: dict[str, object]) -> object:
    """Build the method's Options from `key=value` strings or values, checking names and types."""
    return build_options(cls.Options, given, f"method '{cls.name}'")


def require_positive(opts, *keys: str) -> None:
    """A one-line error for the first of the options `keys` that is not positive."""
    for key in keys:
        if getattr(opts, key) <= 0:
            raise DfkdError(f"{key} must be positive, got {getattr(opts, key)}")


def require_choice(opts, key: str, choices: tuple[str, ...]) -> None:
    """A one-line error where the option `key` is none of `choices`."""
    require_one_of(key, getattr(opts, key), choices)


def device_default(value, gpu, cpu, device: torch.device):
    """An option's value, where 0 means "by device": the paper's `gpu` value on a GPU, the `cpu`
    value elsewhere (where the papers' setting spends the budget on the generator, not the
    teacher: benchmarks/cost_breakdown.py, BENCHMARKS.md "Where a CIFAR second goes")."""
    if value:
        return value
    return gpu if device.type == "cuda" else cpu


def create_synthesizer(name: str, teacher: Classifier, options: dict, seed: int) -> Synthesizer:
    cls = method_class(name)
    access = getattr(teacher, "access", None)  # a black-box teacher's (dfkd.blackbox)
    if access and access not in cls.black_box:
        able = sorted(n for n, c in _METHODS.items() if access in c.black_box)
        raise DfkdError(f"method '{name}' needs more of the teacher than a black-box API with "
                        f"{access} access gives; methods that can use it: {', '.join(able)}")
    return cls(teacher, parse_options(cls, options), seed)


def balanced_targets(batch_size: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Class labels covering all classes evenly, in a random order."""
    y = torch.arange(batch_size, device=gen.device) % num_classes
    return y[torch.randperm(batch_size, generator=gen, device=gen.device)]


@contextlib.contextmanager
def student_as_judge(student: Classifier | None):
    """The student inside a synthesis loop (adversarial and competition terms): in eval mode, so
    its BatchNorm statistics stay its own, and without gradients into its weights, which the
    synthesis loss would otherwise fill for nothing. Mode and flags are restored afterwards."""
    if student is None:
        yield None
        return
    was_training = student.training
    flags = [p.requires_grad for p in student.parameters()]
    student.eval().requires_grad_(False)
    try:
        yield student
    finally:
        student.train(was_training)
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)
