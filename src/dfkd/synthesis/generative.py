"""The generator family, online: a network G(z) makes every student batch and learns on its own
schedule inside `synthesize` (DAFL, ZSKT, DFAD, DFQ, RDSKD, MAD; Fast is in fast.py).

G is the zoo's DCGAN-style generator sized to the teacher's input (`generator_<side>`); it
outputs the teacher's normalized input space. Each call of `synthesize(student, step)` first
updates G when the method's schedule says so, then draws a fresh batch from G: its output
brought to [0, 1] pixels (denormalize, clamp) and labelled by the teacher on exactly those
pixels; the engine then trains the student on it. The G objectives are the small pure functions
below (golden-value tested); G minimizes:

    dafl   CE(T, argmax T) + 0.1 * (-mean |f_T|) + 5 * sum(pbar log pbar)       every step
    zskt   -tau^2 KL(p_T || p_S) at tau                                          1 per 10 S steps
    dfad   -mean |T(x) - S(x)| on logits                                         1 per 5 S steps
    dfq    -tau^2 KL(p_T || p_S) + CE(T, argmax T) + 5 * sum(pbar log pbar) + BN(x)   every step
    rdskd  exp(oh - oh_prev) + exp(ie - ie_prev) + ||p2 - p1|| / ||x2 - x1||     stage 1 only
    mad    -tau^2 KL(p_T || p_S), and an EMA copy of G feeds half of each batch  1 per 5 S steps

(f_T: the input of the teacher's head; pbar: the batch mean of softmax(T); tau: `self.temperature`,
the run's temperature, which the engine sets: an adversarial G maximizes exactly the KD loss its
student minimizes.)

Two defaults depart from the papers (other than DFQ's), both measured on the digits suite at a
60-second CPU budget, seed 0 (BENCHMARKS.md, "The method zoo on digits"):
- `bn_weight` = 1: every G objective gets DeepInversion's BatchNorm-statistics prior, as DFQ's
  has. Without it the teacher's labels on G's batches collapse onto 2-3 classes within a few
  hundred steps and every adversarial method's student trails far behind. `bn_weight=0` is the
  paper's loss. A teacher without BatchNorm turns the prior off (`bn_prior` false in the
  report), except for DFQ, whose loss it is: that is an error.
- The student trains with SGD at lr 0.1 (Nesterov momentum 0.9; DFAD's reference uses SGD at 0.1
  on CIFAR), now the engine's default for every method, instead of Adam at 1e-3, whose students
  of these methods trailed on digits. `--optimizer` and `--lr` override it.

The objectives see G's raw output, as in the papers; the student sees the clamped pixels. The
teacher stays in eval mode. The student runs in train mode in an adversarial objective (batch
statistics, as it is trained; the references do the same) and is left in train mode; gradients
reach G only (`torch.autograd.grad` on G's parameters), never the student.

Resumable: G, its optimizer, the EMA copy, RDSKD's snapshots and the step counters are in
`state_dict`; every random draw comes from a generator seeded by (seed, step), never the global
RNG, so a killed run replays exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.hooks import FeatureHook, bn_layers, bn_stats_hooks, get_module, head_path
from dfkd.losses import kd_loss
from dfkd.models import create_model, is_registered, list_models
from dfkd.synthesis.base import (
    Options,
    Synthesizer,
    device_default,
    register_method,
    require_positive,
)

# ---- G objectives: pure functions of the teacher's (and student's) outputs --------------------


def one_hot_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """CE(T(x), argmax T(x)): G should make inputs the teacher classifies confidently."""
    return F.cross_entropy(t_logits, t_logits.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """-mean |f_T(x)|: real inputs excite the teacher's features more than noise does."""
    return -features.abs().mean()


def balance_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """sum(pbar log pbar), pbar the batch mean of softmax(T): the negative entropy of the class
    frequencies, lowest (-log K) when G covers every class equally (DAFL's information entropy)."""
    p = F.softmax(t_logits.float(), dim=1).mean(0)
    return (p * p.clamp_min(1e-12).log()).sum()


def dafl_loss(t_logits: torch.Tensor, features: torch.Tensor, act_weight: float = 0.1,
              ie_weight: float = 5.0) -> torch.Tensor:
    """DAFL's generator loss: one-hot + activation + information entropy."""
    return (one_hot_loss(t_logits) + act_weight * activation_loss(features)
            + ie_weight * balance_loss(t_logits))


def kl_discrepancy(t_logits: torch.Tensor, s_logits: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """tau^2 KL(p_T || p_S) at tau: the student's KD loss, which adversarial G maximizes."""
    return kd_loss(s_logits, t_logits, temperature)


def l1_discrepancy(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """mean |T(x) - S(x)| on logits (DFAD's model discrepancy)."""
    return (t_logits.float() - s_logits.float()).abs().mean()


def dfq_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float,
             adv_weight: float = 1.0, oh_weight: float = 1.0,
             balance_weight: float = 5.0) -> torch.Tensor:
    """DFQ's generator loss without its BN prior (which every method here can add, see
    `bn_weight`): adversarial KL plus the one-hot and class-balance priors."""
    return (-adv_weight * kl_discrepancy(t_logits, s_logits, temperature)
            + oh_weight * one_hot_loss(t_logits) + balance_weight * balance_loss(t_logits))


def diversity_ratio(x: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """||p2 - p1|| / ||x2 - x1|| over the two halves of a batch (RDSKD): small when distinct
    inputs get similar teacher outputs, i.e. G spreads its samples without leaving the
    teacher's confident regions."""
    half = x.shape[0] // 2
    p = F.softmax(t_logits.float(), dim=1)
    dp = (p[half:2 * half] - p[:half]).norm()
    return dp / (x[half:2 * half] - x[:half]).float().norm().clamp_min(1e-12)


def rdskd_loss(t_logits: torch.Tensor, x: torch.Tensor, oh_prev: float, ie_prev: float,
               div_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RDSKD's generator loss: exp penalties on the increments of the one-hot and information
    entropy losses over detached snapshots (a rising loss is punished exponentially, a falling
    one barely counts), plus the diversity ratio. Returns (loss, oh, ie), the last two detached
    for the next snapshot."""
    oh, ie = one_hot_loss(t_logits), balance_loss(t_logits)
    loss = (torch.exp(oh - oh_prev) + torch.exp(ie - ie_prev)
            + div_weight * diversity_ratio(x, t_logits))
    return loss, oh.detach(), ie.detach()


# ---- shared machinery --------------------------------------------------------------------------


def build_generator(teacher, name: str, nz: int, ngf: int, seed: int) -> torch.nn.Module:
    """The zoo generator for the teacher's input (`generator_<side>` unless named), initialised
    from `seed` without touching the global RNG."""
    if len(teacher.spec.shape) != 3:
        raise DfkdError(f"the generator methods make images (C, H, W), but the teacher takes "
                        f"inputs of shape {tuple(teacher.spec.shape)}; use a pixel-space method "
                        "such as deepinv, or noise")
    c, h, w = teacher.spec.shape
    if not name:
        name = f"generator_{h}"
        if h != w or not is_registered(name):
            raise DfkdError(f"no generator for {h}x{w} inputs; set generator=NAME, one of: "
                            f"{', '.join(list_models('generator'))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = create_model(name, kind="generator", nz=nz, channels=c, ngf=ngf)
    g = g.to(teacher.mean.device).eval()
    with torch.no_grad():
        shape = tuple(g(torch.zeros(2, nz, device=teacher.mean.device)).shape[1:])
    if shape != teacher.spec.shape:
        raise DfkdError(f"generator '{name}' makes {shape} inputs but the teacher expects "
                        f"{teacher.spec.shape}; choose another generator=NAME")
    return g.train()


def apply_gradient(optimizer: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> None:
    """One optimizer step on `params` only: gradients of other modules (the student) are neither
    computed nor touched."""
    for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
        p.grad = g
    optimizer.step()


@dataclass
class GeneratorOptions(Options):
    batch_size: int = 256  # samples per student step
    nz: int = 100  # latent size
    ngf: int = 0  # generator width; 0 = 64 (the papers') on a GPU, 16 on a CPU, where G at 64
    # costs more than the teacher and starves the student (docs/methods.md, measured on digits)
    generator: str = ""  # zoo generator; "" = generator_<side> for the teacher's input
    lr_g: float = 1e-3  # Adam learning rate of G
    g_every: int = 1  # one G step every this many student steps
    bn_weight: float = 1.0  # BatchNorm-statistics prior on G's samples (DeepInversion's; part
    # of DFQ's loss, not of the others' papers, where 0 is the paper's loss; see above)


class GeneratorMethod(Synthesizer):
    """Base of the online generator methods: G, its optimizer, the schedule, the batch."""

    family = "online"
    Options = GeneratorOptions
    adversarial: ClassVar[bool] = False  # the objective needs the student
    bn_prior_required: ClassVar[bool] = False  # a teacher without BatchNorm is an error (DFQ)

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        o = options
        o.ngf = device_default(o.ngf, 64, 16, self.device)
        require_positive(o, "batch_size", "nz", "ngf", "lr_g", "g_every")
        if o.batch_size < 2:
            raise DfkdError(f"batch_size must be at least 2 (batch statistics), got "
                            f"{o.batch_size}")
        self.G = build_generator(teacher, o.generator, o.nz, o.ngf, self.batch_seed(-1))
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=o.lr_g)
        self.g_steps = 0  # G updates so far
        if o.bn_weight < 0:
            raise DfkdError(f"bn_weight must be >= 0, got {o.bn_weight}")
        use_bn = o.bn_weight > 0 and (self.bn_prior_required or bool(bn_layers(teacher.net)))
        self.bn_hooks = bn_stats_hooks(teacher.net, self.name) if use_bn else []

    def objective(self, g: torch.Tensor, t_logits: torch.Tensor,
                  s_logits: torch.Tensor | None) -> torch.Tensor:
        """The G loss on raw generator output g (normalized space)."""
        raise NotImplementedError

    def synthesize(self, student, index):
        if self.adversarial and student is None:
            raise DfkdError(f"method '{self.name}' trains its generator against the student and "
                            "needs one (use dfkd distill, not dfkd synthesize)")
        gen = self.rng(index)
        if index % self.opts.g_every == 0:
            self.generator_step(student, gen)
        return self.batch(self.sample(gen, self.opts.batch_size), index)

    def latent(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return torch.randn((n, self.opts.nz), generator=gen, device=self.device)

    def generator_step(self, student, gen: torch.Generator) -> torch.Tensor:
        """One Adam step of G on a fresh latent batch; returns the (detached) loss."""
        g = self.G(self.latent(gen, self.opts.batch_size))
        t_logits = self.teacher.net(g)
        self.teacher_passes += g.shape[0]
        s_logits = None
        if self.adversarial:
            student.train()
            s_logits = student.net(g)
        loss = self.objective(g, t_logits, s_logits)
        if self.bn_hooks:
            loss = loss + self.opts.bn_weight * sum(h.loss for h in self.bn_hooks)
        apply_gradient(self.g_opt, list(self.G.parameters()), loss)
        self.g_steps += 1
        self.after_generator_step()
        return loss.detach()

    def after_generator_step(self) -> None:
        """Hook for methods that track G (MAD's EMA copy)."""

    @torch.no_grad()
    def sample(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return self.G(self.latent(gen, n))

    def batch(self, g: torch.Tensor, index: int) -> dict:
        x = self.teacher.denormalize(g.detach()).clamp(0, 1)
        n = x.shape[0]
        return {"x": x, "target_logits": self.label(x),
                "classes": torch.full((n,), -1, dtype=torch.long, device=x.device),
                "seeds": self.seeds(index, n)}

    def report(self) -> dict:
        return {"generator_steps": self.g_steps, "bn_prior": bool(self.bn_hooks)}

    def state_dict(self) -> dict:
        return copy.deepcopy({**super().state_dict(), "g": self.G.state_dict(),
                              "g_opt": self.g_opt.state_dict(), "g_steps": self.g_steps})

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.G.load_state_dict(state["g"])
        self.g_opt.load_state_dict(state["g_opt"])
        self.g_steps = int(state["g_steps"])


# ---- the methods -------------------------------------------------------------------------------


@dataclass
class DAFLOptions(GeneratorOptions):
    batch_size: int = 512  # (paper, MNIST: 512)
    lr_g: float = 0.2  # (paper, MNIST: 0.2)
    act_weight: float = 0.1  # activation term (paper: 0.1)
    ie_weight: float = 5.0  # information entropy term (paper: 5)


@register_method
class DAFL(GeneratorMethod):
    """DAFL (Chen et al., ICCV 2019): G makes inputs the teacher classifies confidently, evenly."""

    name = "dafl"
    Options = DAFLOptions
    temperature = 1.0  # the reference's KD has no temperature

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        head = head_path(teacher.net, "DAFL's activation term reads the classifier head's input")
        self.features = FeatureHook(get_module(teacher.net, head), capture="input")

    def objective(self, g, t_logits, s_logits):
        o = self.opts
        return dafl_loss(t_logits, self.features.value.flatten(1), o.act_weight, o.ie_weight)


@dataclass
class ZSKTOptions(GeneratorOptions):
    batch_size: int = 128  # (paper: 128)
    g_every: int = 10  # 1 G step per 10 student steps (paper: n_G = 1, n_S = 10)


@register_method
class ZSKT(GeneratorMethod):
    """ZSKT (Micaelli & Storkey, NeurIPS 2019): adversarial G maximizes the T-S KL divergence."""

    name = "zskt"
    Options = ZSKTOptions
    temperature = 1.0  # the paper's KL has no temperature
    student_loss = "at"  # KD plus 250 x attention transfer
    adversarial = True

    def objective(self, g, t_logits, s_logits):
        return -kl_discrepancy(t_logits, s_logits, self.temperature)


@dataclass
class DFADOptions(GeneratorOptions):
    nz: int = 256  # (reference: 256 on CIFAR, 100 on MNIST)
    g_every: int = 5  # 1 G step per 5 student steps (paper: 5)


@register_method
class DFAD(GeneratorMethod):
    """DFAD (Fang et al., 2019): adversarial G maximizes the L1 gap of T and S logits."""

    name = "dfad"
    Options = DFADOptions
    temperature = 1.0  # unused by its L1 student loss; KD at 1 until that loss is wired
    student_loss = "l1"
    adversarial = True

    def objective(self, g, t_logits, s_logits):
        return -l1_discrepancy(t_logits, s_logits)


@dataclass
class DFQOptions(GeneratorOptions):
    adv_weight: float = 1.0  # adversarial KL (unverified)
    oh_weight: float = 1.0  # one-hot prior (unverified)
    balance_weight: float = 5.0  # class-balance prior (unverified; DAFL's 5)


@register_method
class DFQ(GeneratorMethod):
    """DFQ (Choi et al., 2020): adversarial G with BatchNorm, one-hot and class-balance priors."""

    name = "dfq"
    Options = DFQOptions
    temperature = 1.0  # (unverified)
    adversarial = True
    bn_prior_required = True  # the BN prior is part of DFQ's own loss

    def objective(self, g, t_logits, s_logits):
        o = self.opts
        return dfq_loss(t_logits, s_logits, self.temperature, o.adv_weight, o.oh_weight,
                        o.balance_weight)


@dataclass
class RDSKDOptions(GeneratorOptions):
    batch_size: int = 512  # (reference: 512)
    g_iters: int = 2400  # stage 1: G iterations before the student starts (reference: 20 x 120)
    stage1_share: float = 0.5  # stage 1 ends at this share of a wall-clock budget if g_iters
    # are not done by then (the reference has no budget: without this, stage 1 alone would fill
    # a CPU budget and the student would never train)
    epoch: int = 120  # G iterations between snapshot refreshes (reference: 120)
    div_weight: float = 1.0  # diversity term (reference: 1)


@register_method
class RDSKD(GeneratorMethod):
    """RDSKD (Han et al., ICASSP 2021): G with exp penalties on loss increases, then KD at T=10.

    Two stages in one budget: the first call trains G alone for `g_iters` iterations or until
    `stage1_share` of a wall-clock budget is spent, whichever comes first; then G is frozen and
    sampled in eval mode (as the reference) for every student step. The snapshots oh_prev,
    ie_prev start at 0 and are refreshed to the losses of the first iteration of each `epoch`
    (the reference: the second).
    """

    name = "rdskd"
    Options = RDSKDOptions
    temperature = 10.0  # stage 2 KD (reference: 10)

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        require_positive(options, "g_iters", "epoch")
        if not 0 < options.stage1_share <= 1:
            raise DfkdError(f"stage1_share must be in (0, 1], got {options.stage1_share}")
        self.oh_prev, self.ie_prev = 0.0, 0.0

    def synthesize(self, student, index):
        while (self.g_steps < self.opts.g_iters and not self.should_stop()
               and self.budget_used() < self.opts.stage1_share):
            self.generator_step(student, self.rng(-2 - self.g_steps))
        self.G.eval()
        return self.batch(self.sample(self.rng(index), self.opts.batch_size), index)

    def objective(self, g, t_logits, s_logits):
        loss, oh, ie = rdskd_loss(t_logits, g, self.oh_prev, self.ie_prev, self.opts.div_weight)
        if self.g_steps % self.opts.epoch == 0:
            self.oh_prev, self.ie_prev = float(oh), float(ie)
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "oh_prev": self.oh_prev, "ie_prev": self.ie_prev}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.oh_prev, self.ie_prev = float(state["oh_prev"]), float(state["ie_prev"])


@dataclass
class MADOptions(GeneratorOptions):
    nz: int = 256  # (as DFAD)
    g_every: int = 5  # 1 G step per 5 student steps (unverified; DFAD's schedule)
    ema_decay: float = 0.95  # alpha of the EMA copy of G (paper: 0.95)
    ema_fraction: float = 0.5  # share of each student batch drawn from the EMA copy


@register_method
class MAD(GeneratorMethod):
    """MAD (Do et al., NeurIPS 2022): adversarial G plus its EMA copy, both feeding the student."""

    name = "mad"
    Options = MADOptions
    temperature = 1.0  # (unverified)
    adversarial = True

    def __init__(self, teacher, options, seed):
        super().__init__(teacher, options, seed)
        if not 0 <= options.ema_decay < 1 or not 0 <= options.ema_fraction <= 1:
            raise DfkdError(f"ema_decay must be in [0, 1) and ema_fraction in [0, 1], got "
                            f"{options.ema_decay}, {options.ema_fraction}")
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)

    def objective(self, g, t_logits, s_logits):
        return -kl_discrepancy(t_logits, s_logits, self.temperature)

    @torch.no_grad()
    def after_generator_step(self):
        for e, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            e.lerp_(p, 1.0 - self.opts.ema_decay)
        for e, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            e.copy_(b)

    @torch.no_grad()
    def sample(self, gen, n):
        n_ema = round(n * self.opts.ema_fraction)
        parts = [self.G(self.latent(gen, n - n_ema)) if n - n_ema else None,
                 self.G_ema(self.latent(gen, n_ema)) if n_ema else None]
        return torch.cat([p for p in parts if p is not None])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "g_ema": copy.deepcopy(self.G_ema.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.G_ema.load_state_dict(state["g_ema"])
